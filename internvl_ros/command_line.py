"""Checking the node's command line before rclpy reads it: ``-p`` rules and ``--params-file``
entries that reach this node.

Why this must predict rcl and rclpy at all: what they do with a value is silent. rcl keeps one value
of each type per parameter under one node name, and rclpy reads them in a fixed order, so ``-p
threads:=two`` after a file's ``threads: 0`` (or ``temperature: 0.5`` after ``temperature: 1``) is
dropped without a word; rclpy ignores a name the node does not declare (``max_new_token``); Humble's
rclpy reads no node-name pattern but ``/**`` while Kilted's reads them all. None of it reaches the
node, which sees only the value that won, so the node reads the command line as rcl does (how rcl
types a YAML scalar: ``rcl_type``; tests/test_params.py checks it against rcl itself) and refuses,
with the reason, what would be lost.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .params import PARAMETERS, ParameterError, declared_types

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
    # the node name it is given under, as rcl keeps it: "/**" for a -p rule without one
    node_key: str
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
    # as rcl lists them: by first appearance
    node_names = list(dict.fromkeys(v.node_key for v in given))
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
    last, takes = values[-1], declared_types(PARAMETERS[name])
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
        # the same value given twice loses nothing
        if (read.type, read.text) != (
            last.type,
            last.text,
        ):
            raise ParameterError(
                f"{name}: {last.where} would be lost: rclpy reads {read.where}, given under "
                f"{winner}, instead ({why}; give every value of {name} under one node name)"
            )
