"""The demo behind ``make demo``: the ROS 2 node on a tiny checkpoint, a generated clip played as a
camera, one question in image mode and one in video mode, streamed answers and diagnostics.

The checkpoint has random weights (no real InternVL weights exist here), so the answers are
random words; the demo shows the whole path: checkpoint -> export -> node -> DDS -> answers.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from internvl_ros.bags import write_bag

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent


def show(cmd) -> list[str]:
    cmd = [str(c) for c in cmd]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    return cmd


def moving_circle_clip(seconds: float = 3.0, fps: float = 10.0) -> list[tuple[float, np.ndarray]]:
    frames = []
    for i in range(int(seconds * fps)):
        image = np.full((240, 320, 3), 255, np.uint8)
        cv2.circle(image, (40 + 8 * i, 120), 30, (220, 30, 30), -1)  # RGB red, moving right
        frames.append((i / fps, image))
    return frames


def main() -> int:
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    hf, model, bag = WORK / "tiny", WORK / "tiny_onnx", WORK / "clip_bag"
    if not (model / "manifest.json").is_file():
        subprocess.run(show([BIN / "internvl-make-tiny", "--out", hf]), check=True)
        subprocess.run(show([BIN / "internvl-export", "--hf-model", hf, "--out", model]), check=True)
    if not bag.exists():
        write_bag(bag, moving_circle_clip())
        print(f"\nwrote a 3 s clip of a moving red circle to {bag}")

    node = subprocess.Popen(show([BIN / "internvl_node", "--ros-args", "--params-file", ROOT / "config" / "internvl.yaml",
                                  "-p", f"model_dir:={model}", "-p", "max_new_tokens:=24"]))
    camera = subprocess.Popen(show([BIN / "internvl-play-bag", bag, "--loop", "--restamp"]), stdout=subprocess.DEVNULL)
    try:
        failed = subprocess.run(show([BIN / "internvl-ask", "--mode", "image", "-q", "What color is the shape?"])).returncode
        failed |= subprocess.run(show([BIN / "internvl-ask", "--mode", "video", "-q",
                                       "Which way does the circle move?"])).returncode
    finally:
        for proc in (camera, node):
            proc.send_signal(2)
            proc.wait(20)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
