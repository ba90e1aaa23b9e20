"""The README's ROS 2 commands as a user types them, each in a bash shell with the workspace
sourced: ros2 launch with a namespace and a remapped camera, ros2 topic pub/echo, ros2 param
set/get, ros2 node info, and Ctrl-C of the launch (the whole process group gets SIGINT, as from a
terminal)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import rclpy
import yaml
from images import noise_image
from ros_harness import Client
from ros_tools import needs_ros_tools, shell, stop_ros2_daemon

from internvl_engine import GenerationConfig, Request
from internvl_ros.bags import write_bag

QUESTION = "What is in front of me?"


def wait_for_subscriber(topic: str, timeout: float = 30) -> None:
    """Until something subscribes to ``topic`` (seen from a node of our own that does not)."""
    rclpy.init()
    watcher = rclpy.create_node("internvl_cli_test_watcher")
    try:
        deadline = time.monotonic() + timeout
        while watcher.count_subscribers(topic) < 1:
            assert time.monotonic() < deadline, f"nothing subscribed to {topic}"
            rclpy.spin_once(watcher, timeout_sec=0.1)
    finally:
        watcher.destroy_node()
        rclpy.shutdown()


@pytest.fixture
def launched(tiny_model, tmp_path):
    """ros2 launch internvl_ros internvl.launch.py ... namespace:=/robot, with a camera bag playing
    on /cam/image_raw; yields once the node is up, then presses Ctrl-C."""
    needs_ros_tools("ros2")
    frames = [(0.1 * i, noise_image(60, 80, seed=7)) for i in range(10)]
    bag = write_bag(tmp_path / "camera", frames, image_topic="/cam/image_raw")
    log = open(tmp_path / "launch.log", "w")
    launch = subprocess.Popen(
        [
            "bash",
            "-c",
            f"ros2 launch internvl_ros internvl.launch.py model_dir:={tiny_model} "
            "image_topic:=/cam/image_raw namespace:=/robot",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    camera = subprocess.Popen(
        [
            "bash",
            "-c",
            f"ros2 run internvl_ros internvl-play-bag {bag} --loop --restamp "
            "--wait-for-subscribers 60",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rclpy.init()
    client = Client("/robot")
    try:
        client.wait_ready(90)
    finally:  # gone before the commands run, so the subscriptions they see are theirs
        client.close()
        rclpy.shutdown()
    try:
        yield launch, tmp_path / "launch.log"
    finally:
        os.killpg(camera.pid, signal.SIGINT)
        camera.wait(30)
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
        log.close()
        stop_ros2_daemon()


def test_readme_commands(launched, engine):
    launch, log = launched
    echo = subprocess.Popen(
        ["bash", "-c", "ros2 topic echo --once --full-length /robot/answer std_msgs/msg/String"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_subscriber("/robot/answer")  # the echo must listen before the question goes out
    # The echo's subscription shows in the ROS graph a moment before DDS has matched it with the
    # node's publisher, and an answer published in between is lost (measured here with a cold echo:
    # 19 of 20 lost when published at once, none after 0.3 s; CI once logged the node's answer with
    # nothing echoed). A user then asks again; so does this test, at most three times.
    published = []
    try:
        for _ in range(3):
            pub = shell(
                "ros2 topic pub --once --keep-alive 2 /robot/question std_msgs/msg/String "
                f""""{{data: '{QUESTION}'}}" """
            )
            assert pub.returncode == 0, pub.stdout + pub.stderr
            published.append(pub.stdout + pub.stderr)
            try:
                out = echo.communicate(timeout=40)[0]
                break
            except subprocess.TimeoutExpired:
                continue
        else:  # the node logs each answer: say which side lost the message
            echo.kill()
            pytest.fail(
                "ros2 topic echo got no answer to 3 questions; it "
                f"printed:\n{echo.communicate()[0]}\n"
                f"ros2 topic pub printed:\n{''.join(published)}\nthe launch "
                f"printed:\n{log.read_text()}"
            )
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()
    assert echo.returncode == 0, out
    answer = yaml.safe_load(out[out.index("data:") :].split("\n---", 1)[0])["data"]
    assert answer and not answer.startswith("ERROR"), out
    assert (
        answer
        == engine.answer(
            Request(QUESTION, images=[noise_image(60, 80, seed=7)]),
            GenerationConfig(max_new_tokens=128),
        ).text
    )

    assert (
        "Set parameter successful"
        in shell(
            "ros2 param set /robot/internvl mode video", expect="Set parameter successful"
        ).stdout
    )
    assert (
        shell("ros2 param get /robot/internvl mode", expect="String").stdout.strip()
        == "String value is: video"
    )
    info = shell("ros2 node info /robot/internvl", expect="Subscribers").stdout
    for line in (
        "/robot/internvl",
        "/cam/image_raw: sensor_msgs/msg/Image",
        "/robot/question: std_msgs/msg/String",
        "/robot/answer: std_msgs/msg/String",
        "/robot/answer/stream: std_msgs/msg/String",
        "/diagnostics: diagnostic_msgs/msg/DiagnosticArray",
    ):
        assert line in info, info

    os.killpg(launch.pid, signal.SIGINT)  # Ctrl-C: ros2 launch and the node both get it
    assert launch.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "process has finished cleanly" in text, text
    assert f"({QUESTION!r}): answered (" in text, text  # one log line per answer


def test_launch_with_a_missing_params_file_fails_at_once(tiny_model, tmp_path):
    """launch_ros itself only warns about a parameter file that is not there, and the node would
    then run on its defaults (another camera, another mode) without a word."""
    needs_ros_tools("ros2")
    missing = tmp_path / "internvl.yml"
    run = subprocess.run(
        [
            "bash",
            "-c",
            f"ros2 launch internvl_ros internvl.launch.py model_dir:={tiny_model} "
            f"params_file:={missing}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 1, output
    assert f"params_file {missing}: no such file" in output and "process started" not in output, (
        output
    )
