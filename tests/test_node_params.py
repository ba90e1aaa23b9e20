"""The node's parameters over real DDS, the node as its own process: bad start-up values stop it
with one line naming the parameter, numbers are taken for float parameters, and every parameter that
may change at run time is set and its effect observed (read-only ones are refused)."""

from __future__ import annotations

import time

import pytest
import rclpy
from conftest import with_manifest
from images import noise_image
from ros_harness import ERROR, NodeProcess, image_msg
from test_node import deliver, running_node

from internvl_engine import GenerationConfig, Request
from internvl_engine.session import thread_count
from internvl_ros.params import PARAMETERS


@pytest.fixture(scope="module", autouse=True)
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


def refusal(model_dir, tmp_path, **kwargs) -> str:
    """Start the node, which must exit with status 1 and one "cannot start" line, no traceback: that
    line."""
    proc = NodeProcess(model_dir, tmp_path / "node.log", **kwargs)
    try:
        assert proc.proc.wait(60) == 1
    finally:
        proc.stop()
    log = proc.log()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "cannot start: " in line]
    assert len(lines) == 1, log
    return lines[0]


@pytest.mark.parametrize(
    "model, params, message",
    [
        ("missing", {}, "no such model directory"),
        (
            "tiny",
            {"mode": "bogus"},
            "cannot start: mode: must be one of image, video, text, not 'bogus'",
        ),
        (
            "tiny",
            {"camera_qos": "fast"},
            "cannot start: camera_qos: must be one of auto, sensor_data, reliable, not 'fast'",
        ),
        ("tiny", {"max_new_tokens": 0}, "cannot start: max_new_tokens: "),
        (
            "tiny",
            {"threads": -1},
            "cannot start: threads: Invalid parameter value (-1) for parameter. Reason: Parameter "
            "threads out of range. Min: 0, Max: 256, value: -1",
        ),
        ("tiny", {"temperature": -1.0}, "cannot start: temperature: "),
        ("tiny", {"top_p": 0.0}, "cannot start: top_p: must be in (0, 1], not 0.0"),
        (
            "tiny",
            {"image_topics": "['bad topic!']"},
            "cannot start: image_topics: 'bad topic!' is not a valid topic name",
        ),
        (
            "tiny",
            {"image_topics": "[image_raw, back/image_raw, /image_raw]"},
            "cannot start: image_topics: /image_raw named more than once",
        ),
        # given after a parameter file that sets them, rcl would keep the file's value without a
        # word
        (
            "tiny",
            {"threads": "two"},
            "cannot start: threads: -p threads:=two is a string, not an integer",
        ),
        (
            "tiny",
            {"internvl:autostart": "maybe"},
            "cannot start: autostart: -p internvl:autostart:=maybe is a string, not a bool",
        ),
        (
            "tiny",
            {"image_topics": "[]"},
            "cannot start: image_topics: -p image_topics:=[] is an empty list, which rcl "
            "gives no value",
        ),
        # rclpy would ignore it, and max_new_tokens would stay 128
        (
            "tiny",
            {"max_new_token": 64},
            "cannot start: max_new_token: the node has no such parameter (-p "
            "max_new_token:=64); did you mean max_new_tokens?",
        ),
        # an error the engine does not foresee is named too (rclpy's lifecycle would end the
        # transition silently)
        ("huge cache", {}, "cannot start: internal error: MemoryError: Unable to allocate"),
    ],
)
def test_bad_start_up_stops_with_one_clear_line(
    tiny_model, tiny_layers_model, tmp_path, model, params, message
):
    model_dir = {
        "tiny": tiny_model,
        "missing": tmp_path / "no_model",
        "huge cache": tmp_path / "huge",
    }[model]
    # a per-layer export takes any cache length: this one does not fit in memory
    if model == "huge cache":
        with_manifest(tiny_layers_model, model_dir, "build.kv_cache_len", lambda _: 10**15)
    line = refusal(model_dir, tmp_path, params=params)
    assert message in line
    assert not any(line.endswith(f": {name}") for name in params), line  # named once, at the start


@pytest.mark.parametrize(
    "ros_args, message",
    [
        (
            ["-p", "threads:=[1, 2.5]"],
            "RCLError: failed to initialize rcl: Couldn't parse parameter override rule: "
            "'-p threads:=[1, 2.5]'. Error: Sequence should be of same type.",
        ),
        (
            ["--params-file", "/no/such.yaml"],
            "RCLError: failed to initialize rcl: Couldn't parse params file: "
            "'--params-file /no/such.yaml'. Error: Error opening YAML file",
        ),
        (["--bogus"], "UnknownROSArgsError: ['--bogus']"),
    ],
)
def test_a_command_line_rcl_refuses_stops_with_one_clear_line(
    tiny_model, tmp_path, ros_args, message
):
    line = refusal(tiny_model, tmp_path, ros_args=ros_args)
    assert f"cannot start: rclpy.init refused the command line: {message}" in line
    assert ".c:" not in line, line  # without rcl's source locations


def test_a_second_parameter_file_is_checked_with_the_first(tiny_model, tmp_path):
    # the package file gives max_new_tokens as an integer: rclpy would read it and drop this double
    # silently
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("/**:\n  ros__parameters:\n    max_new_tokens: 64.0\n")
    line = refusal(tiny_model, tmp_path, ros_args=["--params-file", str(overlay)])
    assert f"cannot start: max_new_tokens: 64.0 in {overlay} is a double, not an integer" in line


def test_a_misspelt_name_in_a_file_for_every_node_is_a_warning(tiny_model, tmp_path):
    # read by other nodes too: their parameters are none of this node's business
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "/**:\n  ros__parameters:\n    max_new_token: 8\n    controller_frequency: 20.0\n"
    )
    with running_node(tiny_model, tmp_path, ros_args=["--params-file", str(shared)]) as (proc, _):
        pass
    assert (
        f"max_new_token: the node has no such parameter (in {shared} under /**, which other nodes "
        "may read); "
        "did you mean max_new_tokens?"
    ) in proc.log()
    assert "controller_frequency" not in proc.log()


def test_integers_are_numbers_for_float_parameters(tiny_model, engine, tmp_path):
    with running_node(
        tiny_model, tmp_path, mode="text", max_new_tokens=8, temperature=1, seed=3
    ) as (_, client):
        sampled = engine.answer(
            Request("Hello"), GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3)
        ).text
        assert client.ask_and_wait("Hello") == sampled  # temperature:=1 was taken as 1.0
        assert client.set_parameter("temperature", 0) is True
        assert (
            client.ask_and_wait("Hello")
            == engine.answer(Request("Hello"), GenerationConfig(max_new_tokens=8)).text
        )
        assert client.set_parameter("temperature", "warm") is False
        assert client.last_set_reason == "temperature: must be a number, not 'warm'"
        assert (
            client.set_parameter("temperature", 11) is False
            and "must be in [0, 10]" in client.last_set_reason
        )
        # read-only: needs a restart
        assert client.set_parameter("model_dir", "/elsewhere") is False


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_the_start_up_line_names_the_cpu_threads(tiny_model, tmp_path, threads):
    """A slow node in a container: the launch output says how many threads its CPU quota or cpuset
    left each session (0: as many as the process may use)."""
    n = thread_count(threads)
    with running_node(tiny_model, tmp_path, threads=threads) as (proc, _):
        pass
    assert f"loaded on onnxruntime ({n} CPU thread{'s' * (n != 1)} per session, " in proc.log(), (
        proc.log()
    )


# Every parameter that may change at run time, and the test below that observes its effect.
WRITABLE = {
    "mode",
    "max_images",
    "max_frame_age_s",
    "max_frame_lead_s",
    "image.max_tiles",
    "video.window_s",
    "video.max_buffered_frames",
    "video.num_frames",
    "on_busy",
    "queue_size",
    "system_prompt",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "seed",
    "heartbeat_period_s",
}


def test_every_writable_parameter_has_a_test():
    assert WRITABLE == {name for name, p in PARAMETERS.items() if not p.read_only}
    # on_busy and queue_size are set at run time in test_node.py::test_busy_policies


def asked(client, question: str) -> dict:
    """Ask on the topic; the /diagnostics values of its answer."""
    with client.lock:
        before = len(client.statuses)
    client.ask(question)
    client.wait_for(lambda: len(client.statuses) > before, 60, f"the status of {question!r}")
    with client.lock:
        return client.status_values(client.statuses[before])


def test_camera_and_image_parameters_take_effect(tiny_model, tmp_path):
    wide = noise_image(100, 400, seed=1)
    with running_node(
        tiny_model,
        tmp_path,
        max_new_tokens=2,
        camera_qos="reliable",
        image_topics="[front/image_raw, back/image_raw]",
    ) as (_, client):
        for topic in ("/front/image_raw", "/back/image_raw"):
            deliver(client, topic, image_msg(wide, "rgb8"))
        both = asked(client, "What?")
        assert both["frames"].count("@") == 2
        assert client.set_parameter("max_images", 1)
        one = asked(client, "What?")
        assert one["frames"].count("@") == 1 and one["frames"].startswith("/front/image_raw@")
        assert client.set_parameter("image.max_tiles", 4)
        tiled = asked(client, "What?")
        assert int(tiled["prefill_tokens"]) > int(one["prefill_tokens"])  # 4 tiles and a thumbnail
        assert client.set_parameter("max_frame_age_s", 0.2)
        time.sleep(0.5)
        assert (
            "last frame" in client.ask_and_wait("What?")
            and "(max_frame_age_s 0.2)" in client.answers[-1]
        )
        assert client.set_parameter("max_frame_age_s", 30.0)
        assert not client.ask_and_wait("What?").startswith(ERROR)
        ahead = image_msg(wide, "rgb8")
        ahead.header.stamp.sec, ahead.header.stamp.nanosec = divmod(
            client.node.get_clock().now().nanoseconds + 10**9, 10**9
        )
        deliver(client, "/front/image_raw", ahead, stamp=False)
        assert client.set_parameter("max_images", 2)
        # the front frame is 1 s ahead
        assert asked(client, "What?")["frames"].startswith("/back/image_raw@")
        assert client.set_parameter("max_frame_lead_s", 2.0)
        assert asked(client, "What?")["frames"].startswith("/front/image_raw@")


def stamps(values: dict) -> list[float]:
    return [float(entry.split("@")[1].split(" ")[0]) for entry in values["frames"].split("; ")]


def test_video_parameters_take_effect(tiny_model, tmp_path):
    with running_node(
        tiny_model,
        tmp_path,
        mode="video",
        max_new_tokens=2,
        camera_qos="reliable",
        max_frame_age_s=30.0,
        **{"video.window_s": 2.0},
    ) as (_, client):

        def film(seconds: float):
            for i in range(int(seconds * 20)):  # a 20 Hz camera
                client.send_image("/image_raw", image_msg(noise_image(32, 32, seed=i), "rgb8"))
                time.sleep(0.05)

        film(2.5)
        default = stamps(asked(client, "Which way?"))
        assert len(default) == 8 and default[-1] - default[0] <= 2.0
        assert client.set_parameter("video.num_frames", 4)
        assert len(stamps(asked(client, "Which way?"))) == 4
        assert client.set_parameter("video.max_buffered_frames", 3)
        film(1.0)  # the window is thinned to 3 frames as new ones come
        assert len(stamps(asked(client, "Which way?"))) == 3
        assert client.set_parameter("video.max_buffered_frames", 32) and client.set_parameter(
            "video.window_s", 0.5
        )
        film(1.5)
        short = stamps(asked(client, "Which way?"))
        assert short[-1] - short[0] <= 0.5 + 1e-6


def test_question_and_generation_parameters_take_effect(tiny_model, engine, tmp_path):
    question = "Tell me about the door."
    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=12) as (_, client):

        def answer(**config):
            return engine.answer(
                Request(question), GenerationConfig(**{"max_new_tokens": 12, **config})
            ).text

        assert client.ask_and_wait(question) == answer()
        assert client.set_parameter("max_new_tokens", 3)
        assert client.ask_and_wait(question) == answer(max_new_tokens=3)
        assert client.set_parameter("max_new_tokens", 12)
        for name, value in (
            ("temperature", 1.5),
            ("seed", 11),
            ("top_k", 5),
            ("top_p", 0.5),
            ("repetition_penalty", 1.8),
        ):
            assert client.set_parameter(name, value), name
        configured = dict(temperature=1.5, seed=11, top_k=5, top_p=0.5, repetition_penalty=1.8)
        assert client.ask_and_wait(question) == answer(**configured)
        # each back to its default changes it
        for name in (
            "top_k",
            "top_p",
            "repetition_penalty",
            "seed",
        ):
            default = PARAMETERS[name].default
            assert client.set_parameter(name, default), name
            configured[name] = None if name == "seed" else default
            if name == "seed":
                continue  # a fresh seed per question: not comparable
            assert client.ask_and_wait(question) == answer(**configured), name
        assert client.set_parameter("system_prompt", "You are a robot. Answer briefly.")
        short_system = int(asked(client, question)["prefill_tokens"])
        assert short_system == len(
            engine.prepare(
                Request(question, system_prompt="You are a robot. Answer briefly.")
            ).token_ids
        )
        assert client.set_parameter(
            "mode", "image"
        ) and "no fresh camera frame" in client.ask_and_wait(question)


def test_heartbeat_period_takes_effect_at_once(tiny_model, tmp_path):
    with running_node(tiny_model, tmp_path, heartbeat_period_s=1.0) as (_, client):
        with client.lock:
            first = len(client.heartbeats)
        time.sleep(2.2)
        with client.lock:
            slow = len(client.heartbeats) - first
        assert client.set_parameter("heartbeat_period_s", 0.1)
        with client.lock:
            first = len(client.heartbeats)
        time.sleep(2.2)
        with client.lock:
            fast = len(client.heartbeats) - first
        assert slow <= 3 and fast >= 15, (slow, fast)
