"""Every parameter of the node, declared in one place with its description, limits and choices.

``declare(node)`` declares them and checks the start-up values (a bad one raises ParameterError
naming it), after ``check_command_line`` has refused a value on the command line (``-p`` or a
parameter file) of a type its parameter does not take, one rcl would drop for an earlier value, or
one for a parameter the node does not have (which rclpy would ignore); the same checks refuse bad
``ros2 param set`` values with a reason. Numbers are accepted for float parameters whether written
as ``1`` or ``1.0`` (YAML, ``-p``, ``ros2 param set``).
``Settings.read(node)`` takes a consistent snapshot that the worker uses for one question, so a
change takes effect at the next question; read-only ones are fixed when the node starts (ROS refuses
to set them): restart the node to change them. A clean-up and configure reloads the model's files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from internvl_engine.backends import BACKENDS
from internvl_engine.config import DEFAULT_SYSTEM_PROMPT
from internvl_engine.errors import InternVLError
from internvl_engine.llm import RESIDENT_KV
from internvl_engine.sampling import GenerationConfig

MODES = ("image", "video", "text")
BUSY_POLICIES = ("queue", "drop", "preempt")  # jobs.JobQueue.submit
CAMERA_QOS = ("auto", "sensor_data", "reliable")
MAX_NEW_TOKENS = 4096  # the most an answer may be given, by the parameter or a goal


class ParameterError(InternVLError):
    """A parameter value the node cannot start with; the message starts with the parameter's
    name."""


@dataclass(frozen=True)
class Param:
    default: object
    description: str
    read_only: bool = False  # set when the node starts, read at configure; ROS refuses to change it
    limits: tuple | None = None  # (low, high), both allowed
    choices: tuple[str, ...] = ()
    low_open: bool = False  # the low limit itself is not allowed


PARAMETERS: dict[str, Param] = {
    "model_dir": Param(
        "",
        "Model directory: internvl-export output, or a Pulsar2 axmodel directory.",
        read_only=True,
    ),
    "hf_model": Param(
        "",
        "Original checkpoint directory: config and tokenizer when model_dir has none (axmodel "
        "directories).",
        read_only=True,
    ),
    "vit_model": Param(
        "", "ViT model file, when it is not in model_dir (axmodel directories).", read_only=True
    ),
    "server_url": Param(
        "",
        "Answer through this OpenAI-compatible server (internvl-serve, vLLM: http://host:8000/v1) "
        "instead of a model in this process; empty: the local model_dir.",
        read_only=True,
    ),
    "server_model": Param(
        "", "The server's model name (empty: the first it lists).", read_only=True
    ),
    "server_api_key_env": Param(
        "INTERNVL_SERVER_API_KEY",
        "Environment variable holding the server's API key (unset: none); the key itself is "
        "never a parameter, so it is never logged or listed.",
        read_only=True,
    ),
    "server_timeout_s": Param(
        60.0,
        "Server: seconds to wait for a connection and for each piece of the answer.",
        read_only=True,
        limits=(0.1, 3600.0),
    ),
    "backend": Param(
        "auto",
        "Inference backend (auto: axengine for .axmodel files, else onnxruntime).",
        read_only=True,
        choices=BACKENDS,
    ),
    "provider": Param(
        "",
        "axengine provider: AxEngineExecutionProvider (on-board NPU) or AXCLRTExecutionProvider "
        "(PCIe card); empty: the first available.",
        read_only=True,
    ),
    "resident_kv": Param(
        "auto",
        "Keep the KV cache in the backend's buffers: auto (if a trial run at configure "
        "agrees with the plain path), on (required), off (hand every run the whole cache, as the "
        "seed demo).",
        read_only=True,
        choices=RESIDENT_KV,
    ),
    "threads": Param(
        0,
        "CPU threads per model session (0: every core the node may use, within its CPU quota).",
        read_only=True,
        limits=(0, 256),
    ),
    "autostart": Param(
        True,
        "Configure and activate at start-up. Set false when a lifecycle manager (nav2's "
        "lifecycle_manager) brings the node up.",
        read_only=True,
    ),
    "image_topics": Param(
        ["image_raw"],
        "Camera topics (relative names); one ending in /compressed is a "
        "sensor_msgs/CompressedImage topic. Their order is the images' order in the prompt.",
        read_only=True,
    ),
    "camera_qos": Param(
        "auto",
        "Camera subscription reliability: auto (what the camera's publishers offer: reliable "
        "when all are, else best effort; re-checked as publishers come and go, as ros2 topic echo "
        "does), sensor_data (best effort: every camera connects, lost fragments lose frames) or "
        "reliable (only reliable cameras connect).",
        read_only=True,
        choices=CAMERA_QOS,
    ),
    "mode": Param(
        "image",
        "What a question is asked about: image (the latest frame of each camera), video (a "
        "recent clip of one camera) or text (no image).",
        choices=MODES,
    ),
    "max_images": Param(
        4, "Image mode: latest frames of at most this many cameras.", limits=(1, 16)
    ),
    "max_frame_age_s": Param(
        2.0,
        "A camera whose latest frame is older than this (header stamp, or receive time "
        "when the stamp is zero) is not used: not its frame in image mode, not its clip in "
        "video mode.",
        limits=(0.0, 3600.0),
    ),
    "max_frame_lead_s": Param(
        0.5,
        "A frame stamped further ahead of this node's clock is not used (the camera's "
        "clock is ahead: clock skew between machines).",
        limits=(0.0, 3600.0),
    ),
    "image.max_tiles": Param(
        1,
        "InternVL dynamic tiling: at most this many tiles per image (the tile size is the "
        "model's: 448 px for InternVL2.5-1B).",
        limits=(1, 12),
    ),
    "video.window_s": Param(
        4.0,
        "Video mode: seconds of frames kept per camera, counted back from its newest frame.",
        limits=(0.1, 600.0),
    ),
    "video.max_buffered_frames": Param(
        32,
        "Video mode: frames kept per camera, spread over the window (bounds memory).",
        limits=(2, 1024),
    ),
    "video.num_frames": Param(
        8,
        "Video mode: frames sampled uniformly from the window per question (fewer when "
        "the model build's prompt limit holds fewer).",
        limits=(2, 64),
    ),
    "on_busy": Param(
        "queue",
        "A question while busy: queue (wait, at most queue_size), drop (refuse) or preempt "
        "(cancel the running answer).",
        choices=BUSY_POLICIES,
    ),
    "queue_size": Param(
        4,
        "Queue policy: questions waiting at most; more are answered with an error.",
        limits=(1, 1000),
    ),
    "system_prompt": Param(DEFAULT_SYSTEM_PROMPT, "System prompt of the chat template."),
    "max_new_tokens": Param(128, "Longest answer in tokens.", limits=(1, MAX_NEW_TOKENS)),
    "temperature": Param(0.0, "Sampling temperature (0: greedy).", limits=(0.0, 10.0)),
    "top_k": Param(0, "Sample among the k most likely tokens (0: all).", limits=(0, 1_000_000)),
    "top_p": Param(
        1.0,
        "Nucleus sampling probability mass: above 0, at most 1.",
        limits=(0.0, 1.0),
        low_open=True,
    ),
    "repetition_penalty": Param(1.0, "Penalty for repeating tokens (1: off).", limits=(0.01, 10.0)),
    "seed": Param(-1, "Sampling seed (-1: a fresh seed per question).", limits=(-1, 2**31 - 1)),
    "heartbeat_period_s": Param(
        1.0, "Period of the heartbeat status on /diagnostics.", limits=(0.05, 3600.0)
    ),
}


_PYTHON_TYPES = {bool: "bool", int: "integer", float: "double", str: "string"}
_TYPE_WORDS = {
    "bool": "a bool",
    "integer": "an integer",
    "double": "a number",
    "string": "a string",
    "string array": "a list of strings",
}


def _value_type(value) -> str | None:
    """The type of a parameter's Python value, as rcl names it (an empty list is one of strings)."""
    if isinstance(value, list):
        types = {_PYTHON_TYPES.get(type(item)) for item in value} or {"string"}
        return f"{types.pop()} array" if len(types) == 1 and None not in types else None
    return _PYTHON_TYPES.get(type(value))


def declared_types(p: Param) -> tuple[str, ...]:
    """The types a parameter takes, as rcl names them, its default's first: a float parameter takes
    integers too, so that 1 means 1.0 in YAML, -p and ros2 param set alike."""
    default = _value_type(p.default)
    return (default, "integer") if default == "double" else (default,)


def _descriptor(name: str, p: Param):
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    extras = {}
    if p.limits and isinstance(p.default, float):
        extras["floating_point_range"] = [
            FloatingPointRange(from_value=p.limits[0], to_value=p.limits[1], step=0.0)
        ]
    elif p.limits:
        extras["integer_range"] = [
            IntegerRange(from_value=p.limits[0], to_value=p.limits[1], step=1)
        ]
    choices = f" One of: {', '.join(p.choices)}." if p.choices else ""
    # dynamic typing lets an integer through to a float parameter; check() keeps the type honest.
    return ParameterDescriptor(
        name=name,
        description=p.description + choices,
        read_only=p.read_only,
        dynamic_typing=len(declared_types(p)) > 1,
        **extras,
    )


def check(name: str, value) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or None."""
    p = PARAMETERS[name]
    if _value_type(value) not in (takes := declared_types(p)):
        return f"must be {_TYPE_WORDS[takes[0]]}, not {value!r}"
    if p.limits:
        low, high = p.limits
        if not (low < value if p.low_open else low <= value) or value > high:
            return f"must be in {'(' if p.low_open else '['}{low:g}, {high:g}], not {value!r}"
    if p.choices and value not in p.choices:
        return f"must be one of {', '.join(p.choices)}, not {value!r}"
    return None


def declare(node) -> None:
    """Declare every parameter and check the values it starts with (ParameterError on the first bad
    one)."""
    from rclpy.exceptions import ParameterException

    for name, p in PARAMETERS.items():
        try:
            value = node.declare_parameter(name, p.default, _descriptor(name, p)).value
        except ParameterException as e:  # rclpy refuses a value of the wrong type or out of range
            # rclpy ends with the name
            raise ParameterError(f"{name}: {str(e).removesuffix(f': {name}')}") from e
        if why := check(name, value):
            raise ParameterError(f"{name}: {why}")


def validate(params):
    """The ``ros2 param set`` check (an on-set-parameters callback)."""
    from rcl_interfaces.msg import SetParametersResult

    for p in params:
        if p.name in PARAMETERS and (why := check(p.name, p.value)):
            return SetParametersResult(successful=False, reason=f"{p.name}: {why}")
    return SetParametersResult(successful=True)


@dataclass(frozen=True)
class Settings:
    mode: str
    max_images: int
    max_frame_age_s: float
    max_frame_lead_s: float
    max_tiles: int
    num_frames: int
    on_busy: str
    queue_size: int
    system_prompt: str
    generation: GenerationConfig

    @classmethod
    def read(cls, node) -> "Settings":
        v = {name: node.get_parameter(name).value for name in PARAMETERS}
        generation = GenerationConfig(
            max_new_tokens=v["max_new_tokens"],
            temperature=float(v["temperature"]),
            top_k=v["top_k"],
            top_p=float(v["top_p"]),
            repetition_penalty=float(v["repetition_penalty"]),
            seed=None if v["seed"] < 0 else v["seed"],
        )
        return cls(
            mode=v["mode"],
            max_images=v["max_images"],
            max_frame_age_s=float(v["max_frame_age_s"]),
            max_frame_lead_s=float(v["max_frame_lead_s"]),
            max_tiles=v["image.max_tiles"],
            num_frames=v["video.num_frames"],
            on_busy=v["on_busy"],
            queue_size=v["queue_size"],
            system_prompt=v["system_prompt"],
            generation=generation,
        )

    def for_goal(self, mode: str, max_new_tokens: int) -> "Settings":
        """A goal's own mode and token limit (empty and 0: the parameters')."""
        generation = (
            replace(self.generation, max_new_tokens=max_new_tokens)
            if max_new_tokens
            else self.generation
        )
        return replace(self, mode=mode or self.mode, generation=generation)
