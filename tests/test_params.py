"""The node's command-line check without a node process: the type it expects rcl to give a ``-p`` value
is the type rcl gives it (asked of rcl itself, through rclpy), and it finds the rules that reach the node."""
from __future__ import annotations

import pytest
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.context import Context
from rclpy.node import Node

from internvl_ros.params import ParameterError, check_command_line, command_line_overrides, rcl_type

# Plain, quoted and list values, with C's and YAML's number forms, their limits and near misses.
VALUES = ["two", "2", "+5", "-3", "010", "08", "0x10", "0X1F", "-0x1", "0b1", "0x", "1_000",
          "9223372036854775807", "9223372036854775808", "-9223372036854775808", "99999999999999999999",
          "2.5", "1.", ".5", "1e3", "1E3", "1e+3", "1e", "0.0", "0e-400", "1e400", "1e-310", "1e-400", "0x1p3",
          "0x1p-2000", ".inf", "-.Inf", "+.INF", ".iNf", ".nan", "nan", "NAN", "inf", "infinity", "-Infinity",
          "yes", "Y", "on", "OFF", "true", "TRUE", "tRue", "'yes'", '"3"', "~", "null", "a b",
          "[a, b]", "[a, 'b']", "[1, 2]", "[2.0]", "[true, no]", '["1", "2"]', "[]"]


def rclpy_type(value: str | None) -> str:
    """rcl_type's answer in rclpy's Parameter.Type names."""
    return "NOT_SET" if value == "empty list" else value.upper().replace(" ", "_")


def test_rcl_types_a_value_as_rcl_type_says():
    args = ["--ros-args"] + [arg for i, value in enumerate(VALUES) for arg in ("-p", f"p{i}:={value}")]
    context = Context()
    rclpy.init(args=args, context=context)
    try:
        node = Node("typing", context=context)
        got = {value: node.declare_parameter(f"p{i}", descriptor=ParameterDescriptor(dynamic_typing=True)).type_.name
               for i, value in enumerate(VALUES)}
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    assert got == {value: rclpy_type(rcl_type(value)) for value in VALUES}


@pytest.mark.parametrize("value", ["[1, 2.5]", '[1, "2"]', "{a: 1}", "a: b", '"', "[a"])
def test_what_rcl_refuses_is_left_to_rcl(value):
    assert rcl_type(value) is None
    with pytest.raises(RuntimeError, match="Couldn't parse parameter override rule"):
        rclpy.init(args=["--ros-args", "-p", f"p:={value}"], context=Context())


def test_the_rules_that_reach_the_node():
    command_line = ["--threads", "-p", "threads:=9", "--ros-args", "-p", "threads:=two", "--param", "mode:=video",
                    "-p", "threads:=3", "-r", "__ns:=/robot", "-p", "internvl:top_k:=5", "-p", "other:top_p:=0.5",
                    "--", "-p", "seed:=1", "--ros-args", "-p", "robot/internvl:seed:=2", "-p", "bad"]
    assert command_line_overrides(command_line, "/internvl") == {
        "threads": "threads:=3", "mode": "mode:=video", "top_k": "internvl:top_k:=5"}
    assert command_line_overrides(command_line, "/robot/internvl") == {
        "threads": "threads:=3", "mode": "mode:=video", "seed": "robot/internvl:seed:=2"}


@pytest.mark.parametrize("rule, message", [
    ("threads:=two", "threads: -p threads:=two is a string, not an integer"),
    ("threads:=2.5", "threads: -p threads:=2.5 is a double, not an integer"),
    ("threads:=1e400", "threads: -p threads:=1e400 is a string, not an integer"),  # strtod overflows
    ("temperature:=hot", "temperature: -p temperature:=hot is a string, not a double"),
    ("autostart:=maybe", "autostart: -p autostart:=maybe is a string, not a bool"),
    ("internvl:autostart:=1", "autostart: -p internvl:autostart:=1 is an integer, not a bool"),
    ("system_prompt:=42", "system_prompt: -p system_prompt:=42 is an integer, not a string (for a string: "
     "-p 'system_prompt:=\"42\"')"),
    ("image_topics:=cam", "image_topics: -p image_topics:=cam is a string, not a string array (for a string "
     "array: -p 'image_topics:=[cam]')"),
    ("image_topics:=[1, 2]", "image_topics: -p image_topics:=[1, 2] is an integer array, not a string array"),
    ("image_topics:=[]", "image_topics: -p image_topics:=[] is an empty list, which rcl gives no value"),
])
def test_an_override_of_another_type_is_refused(rule, message):
    with pytest.raises(ParameterError) as e:
        check_command_line(["--ros-args", "-p", rule], "/internvl")
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("rule", ["temperature:=1", "temperature:=.inf", "threads:=0x2", "autostart:=on",
                                  "system_prompt:='42'", "image_topics:=[cam, '1']", "mode:=[1, 2.5]",
                                  "unknown:=two", "other:threads:=two"])
def test_an_override_of_a_type_the_parameter_takes_passes(rule):
    check_command_line(["--ros-args", "-p", rule], "/internvl")  # or rcl itself refuses it (mixed list)
