"""The node's command-line check without a node process: the type it expects rcl to give a ``-p``
value is the type rcl gives it, it refuses exactly the layered values that rclpy would not read
(both asked of rcl itself, through rclpy), and it finds the rules and parameter file entries that
reach the node; and the type check of a value set at run time or start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.context import Context
from rclpy.node import Node

from internvl_ros.command_line import check_command_line, given_values, rcl_type
from internvl_ros.params import PARAMETERS, ParameterError, check

# Plain, quoted and list values, with C's and YAML's number forms, their limits and near misses.
VALUES = [
    "two",
    "2",
    "+5",
    "-3",
    "010",
    "08",
    "0x10",
    "0X1F",
    "-0x1",
    "0b1",
    "0x",
    "1_000",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "99999999999999999999",
    "2.5",
    "1.",
    ".5",
    "1e3",
    "1E3",
    "1e+3",
    "1e",
    "0.0",
    "0e-400",
    "1e400",
    "1e-310",
    "1e-400",
    "0x1p3",
    "0x1p-2000",
    ".inf",
    "-.Inf",
    "+.INF",
    ".iNf",
    ".nan",
    "nan",
    "NAN",
    "inf",
    "infinity",
    "-Infinity",
    "yes",
    "Y",
    "on",
    "OFF",
    "true",
    "TRUE",
    "tRue",
    "'yes'",
    '"3"',
    "~",
    "null",
    "a b",
    "[a, b]",
    "[a, 'b']",
    "[1, 2]",
    "[2.0]",
    "[true, no]",
    '["1", "2"]',
    "[]",
]


def rclpy_type(value: str | None) -> str:
    """rcl_type's answer in rclpy's Parameter.Type names."""
    return "NOT_SET" if value == "empty list" else value.upper().replace(" ", "_")


def test_rcl_types_a_value_as_rcl_type_says():
    args = ["--ros-args"] + [
        arg for i, value in enumerate(VALUES) for arg in ("-p", f"p{i}:={value}")
    ]
    context = Context()
    rclpy.init(args=args, context=context)
    try:
        node = Node("typing", context=context)
        got = {
            value: node.declare_parameter(
                f"p{i}", descriptor=ParameterDescriptor(dynamic_typing=True)
            ).type_.name
            for i, value in enumerate(VALUES)
        }
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    assert got == {value: rclpy_type(rcl_type(value)) for value in VALUES}


@pytest.mark.parametrize("value", ["[1, 2.5]", '[1, "2"]', "{a: 1}", "a: b", '"', "[a"])
def test_what_rcl_refuses_is_left_to_rcl(value):
    assert rcl_type(value) is None
    with pytest.raises(RuntimeError, match="Couldn't parse parameter override rule"):
        rclpy.init(args=["--ros-args", "-p", f"p:={value}"], context=Context())


def test_the_rules_and_file_entries_that_reach_the_node(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("""
/**: {ros__parameters: {mode: text, image: {max_tiles: 2}}}
/*: {ros__parameters: {top_p: 0.5}}
/**/internvl: {ros__parameters: {seed: 7}}
internvl: {ros__parameters: {top_k: "9"}}
robot: {internvl: {ros__parameters: {queue_size: 3}}}
/other: {ros__parameters: {threads: 1}}
""")
    command_line = [
        "--threads",
        "-p",
        "threads:=9",
        "--ros-args",
        "-p",
        "threads:=two",
        "--param",
        "mode:=video",
        "--params-file",
        str(params_file),
        "-r",
        "__ns:=/robot",
        "-p",
        "internvl:top_k:=5",
        "-p",
        "other:top_p:=0.5",
        "--",
        "-p",
        "seed:=1",
        "--params-file",
        "x",
        "--ros-args",
        "-p",
        "bad",
    ]

    def reaching(fully_qualified_name):
        return [
            (v.node_key, v.name, v.text, v.type, v.file is not None)
            for v in given_values(command_line, fully_qualified_name)
        ]

    common = [
        ("/**", "threads", "two", "string", False),
        ("/**", "mode", "video", "string", False),
        ("/**", "mode", "text", "string", True),
        ("/**", "image.max_tiles", "2", "integer", True),
    ]
    assert reaching("/internvl") == [
        *common,
        ("/*", "top_p", "0.5", "double", True),
        ("/**/internvl", "seed", "7", "integer", True),
        ("internvl", "top_k", '"9"', "string", True),
        ("internvl", "top_k", "5", "integer", False),
    ]
    assert reaching("/robot/internvl") == [
        *common,
        ("/**/internvl", "seed", "7", "integer", True),
        ("robot/internvl", "queue_size", "3", "integer", True),
    ]


# Values of each type for parameters of each type, given first in a parameter file and then by -p or
# a second file, all under one node name: rcl keeps one value of each type there.
LAYERED = {
    "temperature": ["1", "0.5", "on", "warm"],
    "threads": ["2", "2.0", "two", "[2]"],
    "autostart": ["false", "0", "'no'"],
    "system_prompt": ["hi", "7", "[hi]"],
    "image_topics": ["[a]", "b", "[1]"],
}


@pytest.mark.parametrize("second", ["-p", "--params-file"])
def test_a_layered_value_is_refused_exactly_when_rclpy_would_not_read_it(tmp_path, second):
    cases = [
        (name, first, then)
        for name, values in LAYERED.items()
        for first in values
        for then in values
    ]
    args = ["--ros-args"]
    for i, (name, first, then) in enumerate(cases):
        for layer, value in (("first", first), ("then", then)):
            if layer == "then" and second == "-p":
                args += ["-p", f"case{i}:{name}:={value}"]
            else:
                (tmp_path / f"{layer}{i}.yaml").write_text(
                    f"case{i}:\n  ros__parameters:\n    {name}: {value}\n"
                )
                args += ["--params-file", str(tmp_path / f"{layer}{i}.yaml")]
    context = Context()
    rclpy.init(args=args, context=context)
    try:
        read = {}
        for i, (name, _, _) in enumerate(cases):
            node = Node(f"case{i}", context=context)
            read[i] = node.declare_parameter(
                name, descriptor=ParameterDescriptor(dynamic_typing=True)
            ).type_.name
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    refused = set()
    for i, (name, first, then) in enumerate(cases):
        try:
            check_command_line(args, f"/case{i}")
        except ParameterError as e:
            assert str(e).startswith(f"{name}: "), e
            refused.add(i)
    takes = {
        "temperature": {"DOUBLE", "INTEGER"},
        "threads": {"INTEGER"},
        "autostart": {"BOOL"},
        "system_prompt": {"STRING"},
        "image_topics": {"STRING_ARRAY"},
    }
    # refused: rclpy would read the first value, or the last one is of a type the parameter does not
    # take
    expected = {
        i
        for i, (name, _, then) in enumerate(cases)
        if read[i] != rclpy_type(rcl_type(then)) or read[i] not in takes[name]
    }
    assert refused == expected
    assert set(takes) == set(LAYERED) and set(takes) <= set(PARAMETERS)


@pytest.mark.parametrize(
    "rule, message",
    [
        ("threads:=two", "threads: -p threads:=two is a string, not an integer"),
        ("threads:=2.5", "threads: -p threads:=2.5 is a double, not an integer"),
        # strtod overflows
        (
            "threads:=1e400",
            "threads: -p threads:=1e400 is a string, not an integer",
        ),
        ("temperature:=hot", "temperature: -p temperature:=hot is a string, not a double"),
        ("autostart:=maybe", "autostart: -p autostart:=maybe is a string, not a bool"),
        ("internvl:autostart:=1", "autostart: -p internvl:autostart:=1 is an integer, not a bool"),
        (
            "system_prompt:=42",
            "system_prompt: -p system_prompt:=42 is an integer, not a string (for a string: "
            "-p 'system_prompt:=\"42\"')",
        ),
        (
            "image_topics:=cam",
            "image_topics: -p image_topics:=cam is a string, not a string array (for a string "
            "array: -p 'image_topics:=[cam]')",
        ),
        (
            "image_topics:=[1, 2]",
            "image_topics: -p image_topics:=[1, 2] is an integer array, not a string array",
        ),
        (
            "image_topics:=[]",
            "image_topics: -p image_topics:=[] is an empty list, which rcl gives no value",
        ),
    ],
)
def test_an_override_of_another_type_is_refused(rule, message):
    with pytest.raises(ParameterError) as e:
        check_command_line(["--ros-args", "-p", rule], "/internvl")
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "rule",
    [
        "temperature:=1",
        "temperature:=.inf",
        "threads:=0x2",
        "autostart:=on",
        "system_prompt:='42'",
        "image_topics:=[cam, '1']",
        "mode:=[1, 2.5]",
        "other:threads:=two",
    ],
)
def test_an_override_of_a_type_the_parameter_takes_passes(rule):
    # or rcl itself refuses it (mixed list)
    check_command_line(["--ros-args", "-p", rule], "/internvl")


@pytest.mark.parametrize(
    "first, then, message",
    [
        ("threads: 0", "threads: two", "threads: two in {then} is a string, not an integer"),
        ("threads: 0", "threads: '2'", "threads: '2' in {then} is a string, not an integer"),
        (
            "image_topics: [a]",
            "image_topics: b",
            "image_topics: b in {then} is a string, not a string array (for a string "
            "array: image_topics: [b])",
        ),
        (
            "system_prompt: hi",
            "system_prompt: 42",
            "system_prompt: 42 in {then} is an integer, not a string (for a string: "
            'system_prompt: "42")',
        ),
        (
            "image_topics: [a]",
            "image_topics: []",
            "image_topics: [] in {then} is an empty list, which rcl gives no value",
        ),
        (
            "temperature: 1",
            "temperature: 0.5",
            "temperature: 0.5 in {then} would be lost: rcl keeps one value of each type, "
            "and rclpy reads 1 in {first} instead, an integer (write each value of temperature as "
            "a double)",
        ),
        (
            "image: {max_tiles: 2}",
            "image:\n      max_tiles: 2.5",
            "image.max_tiles: 2.5 in {then} is a double, not an integer",
        ),
    ],
)
def test_a_second_parameter_file_is_checked_with_the_first(tmp_path, first, then, message):
    files = {}
    for layer, entry in (("first", first), ("then", then)):
        files[layer] = tmp_path / f"{layer}.yaml"
        files[layer].write_text(f"/**:\n  ros__parameters:\n    {entry}\n")
    with pytest.raises(ParameterError) as e:
        check_command_line(
            [
                "--ros-args",
                "--params-file",
                str(files["first"]),
                "--params-file",
                str(files["then"]),
            ],
            "/internvl",
        )
    assert str(e.value).startswith(message.format(**files))


def test_the_package_parameter_file_passes_and_an_unreadable_one_is_left_to_rcl(tmp_path):
    config = Path(__file__).parents[1] / "config" / "internvl.yaml"
    (tmp_path / "bad.yaml").write_text("/**: {ros__parameters: {threads: [}")
    check_command_line(
        [
            "--ros-args",
            "--params-file",
            str(config),
            "--params-file",
            str(tmp_path / "bad.yaml"),
            "--params-file",
            str(tmp_path / "missing.yaml"),
        ],
        "/internvl",
    )


@pytest.mark.parametrize(
    "name, value, why",
    [
        ("temperature", 1, None),
        ("temperature", 0.5, None),
        ("temperature", True, "must be a number, not True"),
        ("temperature", "1", "must be a number, not '1'"),
        ("threads", 2, None),
        ("threads", 2.0, "must be an integer, not 2.0"),
        ("threads", False, "must be an integer, not False"),
        ("autostart", True, None),
        ("autostart", 1, "must be a bool, not 1"),
        ("mode", "text", None),
        ("mode", ["text"], "must be a string, not ['text']"),
        ("image_topics", ["a", "b"], None),
        ("image_topics", ["a", 1], "must be a list of strings, not ['a', 1]"),
        ("image_topics", "a", "must be a list of strings, not 'a'"),
        ("threads", 257, "must be in [0, 256], not 257"),
    ],
)
def test_a_set_value_is_checked_against_the_parameters_type(name, value, why):
    assert check(name, value) == why


@pytest.mark.parametrize(
    "args, refusal",
    [
        (
            ["-p", "max_new_token:=64"],
            "max_new_token: the node has no such parameter (-p max_new_token:=64); did you mean "
            "max_new_tokens?",
        ),
        (
            ["-p", "internvl:qos_overrides./answer.publisher.depth:=3"],
            "qos_overrides./answer.publisher.depth: the node has "
            "no such parameter (-p internvl:qos_overrides./answer.publisher.depth:=3)",
        ),
        (
            ["--params-file", "{file}"],
            "image.max_tile: the node has no such parameter (in {file} under internvl); did you "
            "mean image.max_tiles?",
        ),
    ],
)
def test_a_name_given_to_this_node_that_it_does_not_have_is_refused(tmp_path, args, refusal):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("internvl:\n  ros__parameters:\n    image:\n      max_tile: 2\n")
    with pytest.raises(ParameterError) as e:
        check_command_line(
            ["--ros-args", *(arg.format(file=params_file) for arg in args)], "/internvl"
        )
    assert str(e.value) == refusal.format(file=params_file)


def test_a_name_under_a_wildcard_is_a_warning_only_when_close_to_one_of_the_nodes(tmp_path):
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "/**:\n  ros__parameters:\n    max_new_token: 8\n    controller_frequency: 20.0\n"
        "    use_sim_time: true\n/*/internvl:\n  ros__parameters:\n    temprature: 0.5\n"
        "other:\n  ros__parameters:\n    seeed: 1\n"
    )
    warnings = check_command_line(
        ["--ros-args", "--params-file", str(shared), "-p", "other:max_new_token:=1"],
        "/robot/internvl",
        rclpy_parameters={"use_sim_time"},
    )
    assert warnings == [
        f"max_new_token: the node has no such parameter (in {shared} under /**, which other nodes "
        "may read); did you "
        "mean max_new_tokens?",
        f"temprature: the node has no such parameter (in {shared} under /*/internvl, which other "
        "nodes may read); did "
        "you mean temperature?",
    ]


def test_a_parameter_dump_of_another_distro_loads(tmp_path):
    # ros2 param dump under Kilted; Humble has no start_type_description_service
    dump = tmp_path / "dump.yaml"
    dump.write_text(
        "/internvl:\n  ros__parameters:\n    max_new_tokens: 64\n    "
        "start_type_description_service: true\n"
        "    use_sim_time: false\n"
    )
    assert check_command_line(["--ros-args", "--params-file", str(dump)], "/internvl") == []


def test_rclpy_ignores_a_name_the_node_does_not_declare():
    """Why the check refuses one: the value goes nowhere, and the parameter meant keeps its
    default."""
    context = Context()
    rclpy.init(args=["--ros-args", "-p", "max_new_token:=64"], context=context)
    try:
        node = Node("internvl", context=context)
        assert node.declare_parameter("max_new_tokens", 128).value == 128
        assert not node.has_parameter("max_new_token")
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


def rclpy_reads(args: list[str], name: str):
    """The value a node named internvl starts with, as this rclpy (Kilted) reads the command
    line."""
    context = Context()
    rclpy.init(args=args, context=context)
    try:
        node = Node("internvl", context=context)
        value = node.declare_parameter(
            name, descriptor=ParameterDescriptor(dynamic_typing=True)
        ).value
        node.destroy_node()
        return value
    finally:
        rclpy.shutdown(context=context)


def test_a_value_under_another_node_name_is_refused_when_an_earlier_name_wins(tmp_path):
    every_node, own = tmp_path / "every_node.yaml", tmp_path / "own.yaml"
    every_node.write_text("/**:\n  ros__parameters:\n    threads: 0\n")
    own.write_text("/internvl:\n  ros__parameters:\n    threads: 2\n")
    args = [
        "--ros-args",
        "--params-file",
        str(every_node),
        "--params-file",
        str(own),
        "-p",
        "threads:=3",
    ]
    # rcl lists /** first: the -p joins it, and /internvl wins
    assert rclpy_reads(args, "threads") == 2
    with pytest.raises(ParameterError) as e:
        check_command_line(args, "/internvl")
    assert str(e.value) == (
        f"threads: -p threads:=3 would be lost: rclpy reads 2 in {own}, given under /internvl, "
        "instead (rcl lists node names in the order they first appear, and rclpy takes the last; "
        "give every value of threads under one node name)"
    )
    # Kilted reads the -p here, Humble the file's value: the node's own name wins there
    with pytest.raises(ParameterError, match="Humble's rclpy takes the node's own name over /"):
        check_command_line(
            ["--ros-args", "--params-file", str(own), "-p", "threads:=3"], "/internvl"
        )
    pattern = tmp_path / "pattern.yaml"
    pattern.write_text("/*:\n  ros__parameters:\n    threads: 4\n")
    with pytest.raises(ParameterError, match="Humble's rclpy reads no pattern but /"):
        check_command_line(
            ["--ros-args", "--params-file", str(every_node), "--params-file", str(pattern)],
            "/internvl",
        )
    # Under patterns alone, Kilted reads the value and Humble none of them
    nested = tmp_path / "nested.yaml"
    nested.write_text("/**/internvl:\n  ros__parameters:\n    threads: 5\n")
    for files, read, given, key in (
        ([pattern], 4, pattern, "/*"),
        ([nested], 5, nested, "/**/internvl"),
        ([pattern, nested], 5, nested, "/**/internvl"),
    ):
        args = [a for f in files for a in ("--params-file", str(f))]
        assert rclpy_reads(["--ros-args", *args], "threads") == read
        with pytest.raises(ParameterError) as e:
            check_command_line(["--ros-args", *args], "/internvl")
        assert str(e.value) == (
            f"threads: {read} in {given} would be lost on Humble, whose rclpy reads no pattern "
            f"but /** (in {given} under {key}; give threads under /** or under the node's own "
            "name)"
        )
    files = [
        "--ros-args",
        "--params-file",
        str(every_node),
        "--params-file",
        str(own),
    ]  # as the launch file gives
    for args, read in (
        (files, 2),
        (files + ["-p", "internvl:threads:=3"], 3),
        (files + ["-p", "threads:=2"], 2),
    ):
        assert check_command_line(args, "/internvl") == []
        assert rclpy_reads(args, "threads") == read
