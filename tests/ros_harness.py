"""Real rclpy over real DDS for the node tests: the node runs as its own process, started the way
launch/internvl.launch.py starts it; the test side is an ordinary rclpy node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sensor_msgs.msg import CompressedImage, Image

from internvl_ros.client import RELIABLE, Client  # noqa: F401  (re-exported for the tests)
from internvl_ros.interface import ERROR_PREFIX as ERROR  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def node_command(
    model_dir: Path,
    params: dict | None = None,
    namespace: str = "",
    remaps: dict | None = None,
    ros_args: list[str] | None = None,
) -> list[str]:
    """The command launch_ros builds for internvl.launch.py: the package's parameter file, then
    overrides, the node name, namespace and remappings; then any other ROS arguments."""
    cmd = [
        str(BIN / "internvl_node"),
        "--ros-args",
        "-r",
        "__node:=internvl",
        "--params-file",
        str(ROOT / "config" / "internvl.yaml"),
    ]
    if model_dir:  # none: a node answering through a server
        cmd += ["-p", f"model_dir:={model_dir}"]
    for key, value in (params or {}).items():
        cmd += ["-p", f"{key}:={value}"]
    if namespace:
        cmd += ["-r", f"__ns:={namespace}"]
    for src, dst in (remaps or {}).items():
        cmd += ["-r", f"{src}:={dst}"]
    return cmd + (ros_args or [])


class NodeProcess:
    def __init__(self, model_dir: Path, log_path: Path, env: dict | None = None, **kwargs):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            node_command(model_dir, **kwargs), stdout=self._log, stderr=subprocess.STDOUT, env=env
        )

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT, as ros2 launch does
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def image_msg(rgb, encoding: str, padding: int = 0, big_endian: bool = False) -> Image:
    """A sensor_msgs/Image of an RGB array in ``encoding``, optionally with row padding."""
    import numpy as np

    from internvl_ros.image_msgs import ENCODINGS, rgb_to_pixels

    pixels = rgb_to_pixels(rgb, encoding)
    if pixels.dtype == np.uint16:  # a low byte unlike the high one, so a byte-order mistake shows
        pixels = ((pixels & 0xFF00) | 0x3C).astype(">u2" if big_endian else "<u2")
    h, w = rgb.shape[:2]
    # NV21: 1.5 h rows
    rows = np.ascontiguousarray(pixels).reshape(pixels.shape[0], -1).view(np.uint8)
    planes = [rows]
    # its chroma rows are twice as long as its Y rows, padding too
    if ENCODINGS[encoding].chroma_plane == 444:
        planes = [rows[:h], rows[h:].reshape(h, -1)]
    data = b"".join(
        np.pad(
            plane, ((0, 0), (0, padding * (plane.shape[1] // rows.shape[1]))), constant_values=77
        ).tobytes()
        for plane in planes
    )
    return Image(
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=int(big_endian),
        step=rows.shape[1] + padding,
        data=data,
    )


def compressed_msg(rgb, fmt: str = "jpeg") -> CompressedImage:
    import cv2

    ok, data = cv2.imencode(
        ".jpg" if fmt == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    )
    assert ok
    return CompressedImage(format=fmt, data=data.tobytes())
