"""The real ROS 2 command-line tools (launch_test, ros2) for the tests that run them as a user types
them, in a shell with the colcon workspace sourced. They are not on PyPI: ``make test`` installs
their Humble sources from ../shared/vendor/ros2 where it exists and sources
ros2_ws/install/setup.bash; elsewhere the tests that need them skip and say why."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from ros_harness import ROOT

WORKSPACE = ROOT / "ros2_ws" / "install"


def sourced_workspace() -> bool:
    return str(WORKSPACE / "internvl_ros") in os.environ.get("AMENT_PREFIX_PATH", "").split(
        os.pathsep
    )


def needs_ros_tools(*commands: str) -> None:
    if not sourced_workspace():
        pytest.skip(
            f"run with the workspace sourced (make test does: source {WORKSPACE}/setup.bash)"
        )
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: launch, launch_testing and the ros2 CLI are not "
            "on PyPI "
            "(make test installs them from ../shared/vendor/ros2 when it exists; a ROS 2 install "
            "has them)"
        )


def shell(
    command: str, expect: str = "", tries: int = 5, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run ``command`` as typed, in bash. With ``expect``, run it again (as a user would) while the
    output lacks it: the ros2 daemon that a first command starts may not have seen the whole graph
    yet ("Node not found")."""
    for attempt in range(tries):
        run = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=timeout
        )
        if expect in run.stdout or attempt == tries - 1:
            return run
        time.sleep(1)


def stop_ros2_daemon() -> None:
    """The ros2 CLI starts a daemon on first use; stop the one this test process's domain
    started."""
    if shutil.which("ros2"):
        subprocess.run(["ros2", "daemon", "stop"], capture_output=True, timeout=30)
