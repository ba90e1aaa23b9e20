"""The launch file under launch_testing, with a recorded bag (tests/launch/bag_launch_test.py), run
by the launch_test command as on a ROS 2 machine."""

from __future__ import annotations

import subprocess

from ros_harness import ROOT
from ros_tools import needs_ros_tools


def test_launch_file_answers_a_recorded_bag_on_sim_time():
    needs_ros_tools("launch_test", "ros2")
    run = subprocess.run(
        ["launch_test", str(ROOT / "tests" / "launch" / "bag_launch_test.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    assert (
        "test_the_bag_question_is_answered" in output
        and "test_every_process_exits_cleanly" in output
    )
