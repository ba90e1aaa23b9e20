"""Every parameter of the node, declared in one place with its description and range.

``declare(node)`` declares them; ``Settings.read(node)`` takes a consistent snapshot that the
worker uses for one question, so ``ros2 param set`` takes effect at the next question.
"""
from __future__ import annotations

from dataclasses import dataclass

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.node import Node

from internvl_engine import DEFAULT_SYSTEM_PROMPT, GenerationConfig, InternVLError, InvalidRequestError
from internvl_engine.llm import RESIDENT_KV
from internvl_engine.session import BACKENDS

MODES = ("image", "video", "text")
BUSY_POLICIES = ("queue", "drop", "preempt")
CAMERA_QOS = ("sensor_data", "reliable")


def _int(lo, hi):
    return {"integer_range": [IntegerRange(from_value=lo, to_value=hi, step=1)]}


def _float(lo, hi):
    return {"floating_point_range": [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]}


# name: (default, description, descriptor extras). read_only ones need a restart.
PARAMETERS = {
    "model_dir": ("", "Model directory: internvl-export output, or a Pulsar2 axmodel directory.", {"read_only": True}),
    "hf_model": ("", "Original checkpoint directory: config and tokenizer when model_dir has none (axmodel "
                 "directories).", {"read_only": True}),
    "vit_model": ("", "ViT model file, when it is not in model_dir (axmodel directories).", {"read_only": True}),
    "backend": ("auto", f"Inference backend: {', '.join(BACKENDS)} (auto: axengine for .axmodel files).",
                {"read_only": True}),
    "provider": ("", "axengine provider: AxEngineExecutionProvider (on-board NPU) or AXCLRTExecutionProvider "
                 "(PCIe card); empty: the first available.", {"read_only": True}),
    "resident_kv": ("auto", "Keep the KV cache in the backend's buffers: auto (if a trial run at start-up agrees with "
                    "the plain path), on (required), off (hand every run the whole cache, as the seed demo).",
                    {"read_only": True}),
    "threads": (0, "CPU threads per model session (0: all cores).", {"read_only": True, **_int(0, 256)}),
    "image_topics": (["image_raw"], "Camera topics (relative names); one ending in /compressed is a "
                     "sensor_msgs/CompressedImage topic.", {"read_only": True}),
    "camera_qos": ("sensor_data", "Camera subscription QoS: sensor_data (best effort; every camera connects) or "
                   "reliable (only reliable cameras connect; large frames survive lossy transports).",
                   {"read_only": True}),
    "mode": ("image", f"What a question is asked about: {', '.join(MODES)}.", {}),
    "max_images": (4, "Image mode: latest frames of at most this many cameras.", _int(1, 16)),
    "max_frame_age_s": (2.0, "A camera whose latest frame is older than this (header stamp, or receive time "
                        "when the stamp is zero) is not used: not its frame in image mode, not its clip in video "
                        "mode (the clip itself spans video.window_s).", _float(0.0, 3600.0)),
    "image.max_tiles": (1, "InternVL dynamic tiling: at most this many 448px tiles per image.", _int(1, 12)),
    "video.window_s": (4.0, "Video mode: seconds of recent frames kept per camera.", _float(0.1, 600.0)),
    "video.max_buffered_frames": (32, "Video mode: frames kept per camera, spread over the window "
                                  "(bounds memory).", _int(1, 1024)),
    "video.num_frames": (8, "Video mode: frames sampled uniformly from the window per question.", _int(1, 64)),
    "on_busy": ("queue", f"A question while busy: {', '.join(BUSY_POLICIES)}.", {}),
    "queue_size": (4, "Queue policy: questions waiting at most; more are answered with an error.", _int(1, 1000)),
    "system_prompt": (DEFAULT_SYSTEM_PROMPT, "System prompt of the chat template.", {}),
    "max_new_tokens": (128, "Longest answer in tokens.", _int(1, 4096)),
    "temperature": (0.0, "Sampling temperature (0: greedy).", _float(0.0, 10.0)),
    "top_k": (0, "Sample among the k most likely tokens (0: all).", _int(0, 1_000_000)),
    "top_p": (1.0, "Nucleus sampling probability mass.", _float(0.0, 1.0)),
    "repetition_penalty": (1.0, "Penalty for repeating tokens (1: off).", _float(0.01, 10.0)),
    "seed": (-1, "Sampling seed (-1: a fresh seed per question).", _int(-1, 2**31 - 1)),
    "heartbeat_period_s": (1.0, "Period of the heartbeat status on /diagnostics.", _float(0.05, 3600.0)),
}


def declare(node: Node) -> None:
    """Declare every parameter; the same checks apply to start-up values and to later changes."""
    for name, (default, description, extras) in PARAMETERS.items():
        node.declare_parameter(name, default, ParameterDescriptor(description=description, **extras))
    result = _validate(node.get_parameters(list(PARAMETERS)))
    if not result.successful:
        raise InternVLError(f"invalid parameter: {result.reason}")
    node.add_on_set_parameters_callback(_validate)


def _validate(params) -> SetParametersResult:
    for p in params:
        allowed = {"mode": MODES, "on_busy": BUSY_POLICIES, "camera_qos": CAMERA_QOS, "backend": BACKENDS,
                   "resident_kv": RESIDENT_KV}.get(p.name)
        if allowed and p.value not in allowed:
            return SetParametersResult(successful=False, reason=f"{p.name} must be one of {', '.join(allowed)}")
        if p.name == "top_p" and p.value <= 0:
            return SetParametersResult(successful=False, reason="top_p must be > 0")
    return SetParametersResult(successful=True)


@dataclass(frozen=True)
class Settings:
    mode: str
    max_images: int
    max_frame_age_s: float
    max_tiles: int
    window_s: float
    max_buffered_frames: int
    num_frames: int
    on_busy: str
    queue_size: int
    system_prompt: str
    generation: GenerationConfig

    @classmethod
    def read(cls, node: Node) -> "Settings":
        v = {name: node.get_parameter(name).value for name in PARAMETERS}
        try:
            generation = GenerationConfig(
                max_new_tokens=v["max_new_tokens"], temperature=v["temperature"], top_k=v["top_k"],
                top_p=v["top_p"], repetition_penalty=v["repetition_penalty"],
                seed=None if v["seed"] < 0 else v["seed"])
        except InvalidRequestError as e:
            raise ValueError(f"invalid generation parameters: {e}") from None
        return cls(mode=v["mode"], max_images=v["max_images"], max_frame_age_s=v["max_frame_age_s"],
                   max_tiles=v["image.max_tiles"], window_s=v["video.window_s"],
                   max_buffered_frames=v["video.max_buffered_frames"], num_frames=v["video.num_frames"],
                   on_busy=v["on_busy"], queue_size=v["queue_size"], system_prompt=v["system_prompt"],
                   generation=generation)
