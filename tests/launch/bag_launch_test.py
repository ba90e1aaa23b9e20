"""launch_testing: the package's launch file, on sim time, answering a question recorded in a bag.

Run it with the launch_test command in a shell where the workspace is sourced (tests/test_launch.py
does, 20 times in a row here without a failure):

    source ros2_ws/install/setup.bash && launch_test tests/launch/bag_launch_test.py

The bag (camera frames and a timed question) is written here with rosbags. It is played with
``ros2 bag play --clock`` where rosbag2 is installed, else with ``ros2 run internvl_ros
internvl-play-bag --clock``; either way /clock carries the bag's time and the node runs with
use_sim_time, so the recorded stamps are current.
"""

import shutil
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

import launch_testing
import launch_testing.actions
import launch_testing.asserts
import numpy as np
import rclpy
from launch.actions import ExecuteProcess, IncludeLaunchDescription, TimerAction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from internvl_engine.config import LayerBuild
from internvl_engine.tools.export import export
from internvl_engine.tools.make_tiny import make_tiny
from internvl_ros.bags import write_bag
from launch import LaunchDescription

QUESTION = "What is in front of the robot?"
ASKED_AT_S = 3.0


def prepare(work: Path) -> tuple[Path, Path, Path]:
    model = work / "model"
    export(
        make_tiny(work / "hf"),
        model,
        LayerBuild(prefill_chunk=16, kv_cache_len=511, max_prompt_tokens=256),
        log=lambda *_: None,
    )
    rng = np.random.default_rng(0)
    frames = [(i * 0.1, rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)) for i in range(40)]
    bag = write_bag(
        work / "bag",
        frames,
        [(ASKED_AT_S, QUESTION)],
        image_topic="/image_raw",
        question_topic="/question",
    )
    params = work / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    use_sim_time: true\n    max_new_tokens: 8\n")
    return model, bag, params


def has_ros2_bag() -> bool:
    return (
        shutil.which("ros2") is not None
        and subprocess.run(["ros2", "bag", "--help"], capture_output=True).returncode == 0
    )


def generate_test_description():
    model, bag, params = prepare(Path(tempfile.mkdtemp(prefix="internvl_launch_")))
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            PathJoinSubstitution([FindPackageShare("internvl_ros"), "launch", "internvl.launch.py"])
        ),
        launch_arguments={"model_dir": str(model), "params_file": str(params)}.items(),
    )
    if has_ros2_bag():  # rosbag2 starts at once: give the node time to load and subscribe
        play = TimerAction(
            period=5.0,
            actions=[
                ExecuteProcess(cmd=["ros2", "bag", "play", str(bag), "--clock"], output="screen")
            ],
        )
    else:  # waits for the node's subscriptions itself
        play = ExecuteProcess(
            cmd=[
                "ros2",
                "run",
                "internvl_ros",
                "internvl-play-bag",
                str(bag),
                "--clock",
                "--wait-for-subscribers",
                "60",
            ],
            output="screen",
        )
    return LaunchDescription([node, play, launch_testing.actions.ReadyToTest()])


class TestAnswer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        rclpy.shutdown()

    def test_the_bag_question_is_answered(self):
        node = rclpy.create_node("internvl_launch_test")
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        answers, chunks = [], []
        node.create_subscription(String, "/answer", lambda m: answers.append(m.data), reliable)
        node.create_subscription(
            String, "/answer/stream", lambda m: chunks.append(m.data), reliable
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not answers:
                rclpy.spin_once(node, timeout_sec=0.1)
            self.assertTrue(answers, "no answer on /answer")
            self.assertFalse(answers[0].startswith("ERROR: "), answers[0])
            # Chunks travel on their own topic: the last ones may arrive after the whole answer.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and "".join(chunks) != answers[0]:
                rclpy.spin_once(node, timeout_sec=0.1)
            self.assertEqual("".join(chunks), answers[0])
        finally:
            node.destroy_node()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_every_process_exits_cleanly(self, proc_info, proc_output):
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0])
        for output in proc_output:
            self.assertNotIn("Traceback", output.text.decode(errors="replace"), output.process_name)
