"""launch_testing: the package's launch file with `ros2 bag play` of a recorded bag.

Runs on a ROS 2 install (launch_testing, ros2 bag): `colcon test --packages-select internvl_ros`
or `launch_test tests/launch/test_internvl_launch.py` after sourcing the workspace. The bag is
written here with internvl-make-bag's library; the node runs on sim time from `--clock`, so the
recorded stamps count as fresh.
"""
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

import launch_testing
import launch_testing.actions
import launch_testing.asserts
import numpy as np
import pytest
import rclpy
from launch import LaunchDescription
from launch.actions import ExecuteProcess, IncludeLaunchDescription, TimerAction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import PathJoinSubstitution
from launch_ros.substitutions import FindPackageShare
from std_msgs.msg import String

from internvl_ros.bags import write_bag

QUESTION = "What is in front of the robot?"


def prepare(work: Path) -> tuple[Path, Path, Path]:
    hf, model = work / "hf", work / "model"
    subprocess.run(["internvl-make-tiny", "--out", str(hf)], check=True)
    subprocess.run(["internvl-export", "--hf-model", str(hf), "--out", str(model)], check=True)
    rng = np.random.default_rng(0)
    frames = [(i * 0.1, rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)) for i in range(40)]
    bag = write_bag(work / "bag", frames, [(3.0, QUESTION)], image_topic="/image_raw", question_topic="/question")
    params = work / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    use_sim_time: true\n    max_new_tokens: 8\n")
    return model, bag, params


@pytest.mark.launch_test
def generate_test_description():
    model, bag, params = prepare(Path(tempfile.mkdtemp(prefix="internvl_launch_")))
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([FindPackageShare("internvl_ros"), "launch",
                                                            "internvl.launch.py"])),
        launch_arguments={"model_dir": str(model), "params_file": str(params)}.items())
    play = ExecuteProcess(cmd=["ros2", "bag", "play", str(bag), "--clock"], output="screen")
    return LaunchDescription([node, TimerAction(period=5.0, actions=[play]),
                              launch_testing.actions.ReadyToTest()])


class TestAnswer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()

    @classmethod
    def tearDownClass(cls):
        rclpy.shutdown()

    def test_the_bag_question_is_answered(self):
        node = rclpy.create_node("internvl_launch_test")
        answers, chunks = [], []
        node.create_subscription(String, "/answer", lambda m: answers.append(m.data), 10)
        node.create_subscription(String, "/answer/stream", lambda m: chunks.append(m.data), 100)
        deadline = time.time() + 90
        while time.time() < deadline and not answers:
            rclpy.spin_once(node, timeout_sec=0.1)
        node.destroy_node()
        self.assertTrue(answers, "no answer on /answer")
        self.assertFalse(answers[0].startswith("ERROR: "), answers[0])
        self.assertEqual("".join(chunks), answers[0])


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_node_exits_cleanly(self, proc_info):
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15])
