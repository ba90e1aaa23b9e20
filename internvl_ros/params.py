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

import difflib
import math
import re
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from internvl_engine import DEFAULT_SYSTEM_PROMPT, GenerationConfig, InternVLError
from internvl_engine.llm import RESIDENT_KV
from internvl_engine.session import BACKENDS
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.exceptions import ParameterException
from rclpy.node import Node

MODES = ("image", "video", "text")
BUSY_POLICIES = ("queue", "drop", "preempt")
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


def _declared_types(p: Param) -> tuple[str, ...]:
    """The types a parameter takes, as rcl names them, its default's first: a float parameter takes
    integers too, so that 1 means 1.0 in YAML, -p and ros2 param set alike."""
    default = _value_type(p.default)
    return (default, "integer") if default == "double" else (default,)


def _descriptor(name: str, p: Param) -> ParameterDescriptor:
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
        dynamic_typing=len(_declared_types(p)) > 1,
        **extras,
    )


def check(name: str, value) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or None."""
    p = PARAMETERS[name]
    if _value_type(value) not in (takes := _declared_types(p)):
        return f"must be {_TYPE_WORDS[takes[0]]}, not {value!r}"
    if p.limits:
        low, high = p.limits
        if not (low < value if p.low_open else low <= value) or value > high:
            return f"must be in {'(' if p.low_open else '['}{low:g}, {high:g}], not {value!r}"
    if p.choices and value not in p.choices:
        return f"must be one of {', '.join(p.choices)}, not {value!r}"
    return None


def declare(node: Node) -> None:
    """Declare every parameter and check the values it starts with (ParameterError on the first bad
    one)."""
    for name, p in PARAMETERS.items():
        try:
            value = node.declare_parameter(name, p.default, _descriptor(name, p)).value
        except ParameterException as e:  # rclpy refuses a value of the wrong type or out of range
            raise ParameterError(
                f"{name}: {str(e).removesuffix(f': {name}')}"
            ) from e  # rclpy ends with the name
        if why := check(name, value):
            raise ParameterError(f"{name}: {why}")


# How rcl_yaml_param_parser types a plain (unquoted) scalar: these words are booleans, then what C's
# strtol (base 0) reads whole without overflow is an integer, then what strtod reads so is a double.
_RCL_BOOLS = {
    "Y",
    "y",
    "yes",
    "Yes",
    "YES",
    "true",
    "True",
    "TRUE",
    "on",
    "On",
    "ON",
    "N",
    "n",
    "no",
    "No",
    "NO",
    "false",
    "False",
    "FALSE",
    "off",
    "Off",
    "OFF",
}
_YAML_INF_NAN = {".nan", ".NaN", ".NAN"} | {
    sign + inf for sign in ("", "+", "-") for inf in (".inf", ".Inf", ".INF")
}
_C_INTEGER = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_C_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_C_HEX_FLOAT = re.compile(r"[+-]?0[xX]([0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)([pP][+-]?\d+)?")
_C_INF_NAN = re.compile(r"[+-]?(inf|infinity|nan(\([0-9A-Za-z_]*\))?)", re.IGNORECASE)


def _is_c_long(text: str) -> bool:
    if not _C_INTEGER.fullmatch(text):
        return False
    digits = text.lstrip("+-")
    value = int(text, 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10)
    return -(2**63) <= value < 2**63


def _is_c_double(text: str) -> bool:
    if text in _YAML_INF_NAN or _C_INF_NAN.fullmatch(text):
        return True
    if match := _C_HEX_FLOAT.fullmatch(text):
        value = float.fromhex(text)
    elif match := _C_DECIMAL.fullmatch(text):
        value = float(text)
    else:
        return False
    # strtod reports overflow and underflow (a subnormal result too) as errors: rcl then takes a
    # string
    zero = not re.search(r"[1-9a-fA-F]", match.group(1))
    return math.isfinite(value) and (abs(value) >= sys.float_info.min or zero)


def _rcl_scalar_type(node: yaml.ScalarNode) -> str:
    if node.style in ("'", '"'):
        return "string"
    if node.value in _RCL_BOOLS:
        return "bool"
    return (
        "integer" if _is_c_long(node.value) else "double" if _is_c_double(node.value) else "string"
    )


def _rcl_node_type(node: yaml.Node) -> str | None:
    if isinstance(node, yaml.ScalarNode):
        return _rcl_scalar_type(node)
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            return "empty list"
        if all(isinstance(item, yaml.ScalarNode) for item in node.value):
            types = {_rcl_scalar_type(item) for item in node.value}
            return f"{types.pop()} array" if len(types) == 1 else None
    return None


def rcl_type(value: str) -> str | None:
    """The type rcl gives the value of ``-p name:=value`` (or ``name: value`` in a parameter file):
    bool, integer, double, string or one of them followed by " array"; "empty list" for ``[]`` (rcl
    gives it no value at all); None for what rcl refuses at start-up itself (a list of mixed types,
    a mapping) or reads oddly (nested lists)."""
    try:
        return _rcl_node_type(yaml.compose(value))
    except yaml.YAMLError:
        return None


def _a(type_name: str) -> str:
    return f"{'an' if type_name[0] in 'aeiou' else 'a'} {type_name}"


@dataclass(frozen=True)
class GivenValue:
    """A value the command line gives a parameter: a ``-p`` rule, or an entry of a
    ``--params-file``."""

    name: str
    node_key: (
        str  # the node name it is given under, as rcl keeps it: "/**" for a -p rule without one
    )
    type: str | None  # as rcl_type says
    text: str  # the value as written
    file: str | None = None  # None for a -p rule

    @property
    def where(self) -> str:
        return (
            f"-p {self._target}:={self.text}"
            if self.file is None
            else f"{self.text} in {self.file}"
        )

    @property
    def given(self) -> str:
        """Where its name is given: the -p rule, or the file and the node name it is under."""
        return self.where if self.file is None else f"in {self.file} under {self.node_key}"

    @property
    def _target(self) -> str:
        return self.name if self.node_key == "/**" else f"{self.node_key}:{self.name}"

    def written_as(self, type_name: str) -> str:
        """How to write this value as a string or a string array, or "" for other types."""
        value = {"string": f'"{self.text}"', "string array": f"[{self.text}]"}.get(type_name)
        if value is None:
            return ""
        return f"{self.name}: {value}" if self.file else f"-p '{self._target}:={value}'"


def _reaches(node_key: str, fully_qualified_name: str) -> bool:
    """Whether parameters given under ``node_key`` reach the node: its full name, its name alone
    (which rcl takes as /name), or a pattern where /** stands for any namespaces and /* for one."""
    pattern = re.escape(node_key if node_key.startswith("/") else f"/{node_key}")
    pattern = pattern.replace(r"/\*\*", "(/[^/]+)*").replace(r"/\*", "/[^/]+")
    return re.fullmatch(pattern, fully_qualified_name) is not None


def _items(node: yaml.Node) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    """A mapping's entries with plain keys (rcl refuses the others)."""
    is_mapping = isinstance(node, yaml.MappingNode)
    return (
        [(key, value) for key, value in node.value if isinstance(key, yaml.ScalarNode)]
        if is_mapping
        else []
    )


def _file_values(path: str) -> list[GivenValue]:
    """The entries of a parameter file, under the node names they are given for (nested names join
    with /, as rcl joins them; nested parameter names join with .)."""
    try:
        text = Path(path).read_text()
        root = yaml.compose(text)
    except (OSError, UnicodeError, yaml.YAMLError):
        return []  # rcl read it before this (or refused it): nothing here to add

    def written(node: yaml.Node) -> str:
        return " ".join(text[node.start_mark.index : node.end_mark.index].split())

    def entries(node: yaml.Node, node_key: str, prefix: str):
        for key, value in _items(node):
            if isinstance(value, yaml.MappingNode):
                yield from entries(value, node_key, f"{prefix}{key.value}.")
            else:
                yield GivenValue(
                    prefix + key.value, node_key, _rcl_node_type(value), written(value), path
                )

    def nodes(node: yaml.Node, path_keys: list[str]):
        for key, value in _items(node):
            if key.value == "ros__parameters":
                yield from entries(value, "/".join(path_keys), "")
            else:
                yield from nodes(value, [*path_keys, key.value])

    return list(nodes(root, []))


def given_values(ros_args: Sequence[str], fully_qualified_name: str) -> list[GivenValue]:
    """What the command line gives this node's parameters, in its order: the ``-p
    [node:]name:=value`` rules and the entries of the ``--params-file`` files in ``--ros-args``
    sections, under node names that reach this node."""
    values: list[GivenValue] = []
    in_ros_args = False
    for arg, following in zip(ros_args, [*ros_args[1:], ""]):
        if arg in ("--ros-args", "--"):
            in_ros_args = arg == "--ros-args"
        elif in_ros_args and arg in ("-p", "--param"):
            target, assigns, value = following.partition(":=")
            node, _, name = target.rpartition(":")
            if assigns:
                values.append(GivenValue(name, node or "/**", rcl_type(value), value))
        elif in_ros_args and arg == "--params-file":
            values += _file_values(following)
    return [v for v in values if _reaches(v.node_key, fully_qualified_name)]


# Parameters rclpy declares on every node in one distro or another (Humble has only the first): a
# parameter dump taken under one distro must load under another.
_RCLPY_NODE_PARAMETERS = ("use_sim_time", "start_type_description_service")
# The order in which rclpy reads a parameter's values when rcl holds several (one of each type).
_RCLPY_READS = (
    "bool",
    "integer",
    "double",
    "string",
    "bool array",
    "integer array",
    "double array",
    "string array",
)


def check_command_line(
    ros_args: Sequence[str], fully_qualified_name: str, rclpy_parameters: Collection[str] = ()
) -> list[str]:
    """Refuse (ParameterError) a value on the command line that the node would not take or would
    lose; return warnings about names it would ignore that are not certainly meant for it.

    rclpy ignores a name the node does not declare (one of PARAMETERS, ``rclpy_parameters``, those
    rclpy has declared itself, or _RCLPY_NODE_PARAMETERS): a misspelt ``max_new_token`` would leave
    ``max_new_tokens`` as it was. Given by ``-p`` or under this node's own name it is refused; under
    a wildcard, which other nodes read too, it is a warning when it is close to one of the node's
    names. For the node's parameters, the last value given must be of the parameter's type and be
    the one rclpy reads: see _check_under_one_node_name and _check_across_node_names.
    """
    given = given_values(ros_args, fully_qualified_name)
    warnings: dict[str, str] = {}
    for value in given:
        if (
            value.name in PARAMETERS
            or value.name in rclpy_parameters
            or value.name in _RCLPY_NODE_PARAMETERS
        ):
            continue
        close = difflib.get_close_matches(value.name, PARAMETERS, n=1)
        suggestion = f"; did you mean {close[0]}?" if close else ""
        if value.file is None or "*" not in value.node_key:
            raise ParameterError(
                f"{value.name}: the node has no such parameter ({value.given}){suggestion}"
            )
        if close:
            warnings.setdefault(
                value.name,
                f"{value.name}: the node has no such parameter ({value.given}, which "
                f"other nodes may read){suggestion}",
            )
    node_names = list(
        dict.fromkeys(v.node_key for v in given)
    )  # as rcl lists them: by first appearance
    by_name: dict[str, list[GivenValue]] = {}
    for value in given:
        if value.name in PARAMETERS:
            by_name.setdefault(value.name, []).append(value)
    for name, values in by_name.items():
        for node_key in dict.fromkeys(v.node_key for v in values):
            _check_under_one_node_name(name, [v for v in values if v.node_key == node_key])
        _check_across_node_names(name, values, node_names)
    return list(warnings.values())


def _check_under_one_node_name(name: str, values: list[GivenValue]) -> None:
    """rcl holds one value of each type for a parameter under one node name: after a parameter
    file's ``threads: 0``, ``-p threads:=two`` (or a second file's ``threads: two``) adds a string
    beside the integer, and rclpy reads the integer; after ``temperature: 1``, a later
    ``temperature: 0.5`` is lost the same way. (A value alone of the wrong type rclpy refuses too,
    less clearly.)"""
    last, takes = values[-1], _declared_types(PARAMETERS[name])
    if last.type is None:
        return
    if last.type == "empty list":
        raise ParameterError(
            f"{name}: {last.where} is an empty list, which rcl gives no value (not even its "
            "type), so the parameter would keep its value"
        )
    if last.type not in takes:
        example = last.written_as(takes[0])
        hint = f" (for {_a(takes[0])}: {example})" if example else ""
        raise ParameterError(f"{name}: {last.where} is {_a(last.type)}, not {_a(takes[0])}{hint}")
    latest = {v.type: v for v in values}
    read = latest[next(t for t in _RCLPY_READS if t in latest)]
    if read is not last:
        raise ParameterError(
            f"{name}: {last.where} would be lost: rcl keeps one value of each type, and rclpy "
            f"reads {read.where} instead, {_a(read.type)} (write each value of {name} as "
            f"{_a(last.type)})"
        )


def _check_across_node_names(name: str, values: list[GivenValue], node_names: list[str]) -> None:
    """rclpy merges what the node names that reach the node give. Kilted's (run here) takes the node
    name rcl lists last, and rcl lists them in the order they first appear on the command line:
    after a ``/**`` file and an ``/internvl`` file, a later ``-p threads:=3`` (under ``/**``) is
    lost. Humble's reads ``/**``, then the node's own name over it, whatever the order, and no other
    pattern: a value given only under ``/*`` or ``/**/internvl`` is lost there whole."""
    last = values[-1]
    if last.type is None:
        return
    keys = sorted({v.node_key for v in values}, key=node_names.index)
    own = [k for k in keys if "*" not in k]
    humble = own[-1] if own else "/**" if "/**" in keys else None
    if humble is None:
        raise ParameterError(
            f"{name}: {last.where} would be lost on Humble, whose rclpy reads no pattern but /** "
            f"({last.given}; give {name} under /** or under the node's own name)"
        )
    if len(keys) < 2:
        return
    for winner, why in (
        (keys[-1], "rcl lists node names in the order they first appear, and rclpy takes the last"),
        (
            humble,
            "Humble's rclpy takes the node's own name over /**, whatever the order"
            if own
            else "Humble's rclpy reads no pattern but /**",
        ),
    ):
        read = [v for v in values if v.node_key == winner][-1]
        if (read.type, read.text) != (
            last.type,
            last.text,
        ):  # the same value given twice loses nothing
            raise ParameterError(
                f"{name}: {last.where} would be lost: rclpy reads {read.where}, given under "
                f"{winner}, instead ({why}; give every value of {name} under one node name)"
            )


def validate(params) -> SetParametersResult:
    """The ``ros2 param set`` check (an on-set-parameters callback)."""
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
    def read(cls, node: Node) -> "Settings":
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
