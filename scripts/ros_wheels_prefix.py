"""Make this venv a ROS 2 prefix, as /opt/ros/<distro> is on a ROS machine, so colcon builds
interface packages (internvl_msgs, and composition_interfaces for launch_ros) against the ros-*
wheels and a workspace's install/setup.bash chains to it.

1. The wheels' exported CMake targets name the Python and numpy include directories of the machine
   that built them (``/opt/python/cp311-cp311/...``); CMake refuses targets whose include
   directories do not exist. Those paths are rewritten to this interpreter's, in every ``*.cmake``
   file under ``<venv>/share``.
2. ``<venv>/local_setup.{sh,bash}`` put the venv on AMENT_PREFIX_PATH (the wheels' ament index:
   ``ros2 pkg``, ``ros2 interface`` find std_msgs and the rest) and CMAKE_PREFIX_PATH (CMake finds
   ament_cmake), and its bin/ on PATH (``ros2``), so colcon records the venv as the workspace's
   underlay, as it records /opt/ros/<distro>.

Idempotent; run by the Makefile after installing requirements/ros-build.txt. A real ROS 2 install
needs none of this.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import numpy

BUILT_AT = "/opt/python/cp311-cp311"
REPLACEMENTS = {
    f"{BUILT_AT}/lib/python3.11/site-packages/numpy/_core/include": numpy.get_include(),
    f"{BUILT_AT}/include/python3.11": sysconfig.get_paths()["include"],
}


def main() -> int:
    share = Path(sys.prefix) / "share"
    changed = 0
    for path in share.rglob("*.cmake"):
        text = path.read_text()
        if BUILT_AT not in text:
            continue
        for old, new in REPLACEMENTS.items():
            text = text.replace(old, new)
        if BUILT_AT in text:
            print(f"{path}: a path under {BUILT_AT} this script does not know", file=sys.stderr)
            return 1
        path.write_text(text)
        changed += 1
    print(f"ros wheels' CMake files: {changed} rewritten for {sys.prefix}")
    prefix = Path(sys.prefix).resolve()
    script = (
        "# Written by scripts/ros_wheels_prefix.py: this venv as a ROS 2 prefix (the ros-* "
        "wheels).\n"
        f'export AMENT_PREFIX_PATH="{prefix}${{AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}}"\n'
        f'export CMAKE_PREFIX_PATH="{prefix}${{CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}}"\n'
        f'export PATH="{prefix}/bin:$PATH"\n'
    )
    for shell in ("sh", "bash"):
        (prefix / f"local_setup.{shell}").write_text(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
