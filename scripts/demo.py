"""The demo behind ``make demo``: the ROS 2 node on the trained toy checkpoint
(models/internvl-toy), a camera recording of a red circle and a clip of it moving right, played as a
camera, questions in image mode and in video mode, streamed answers and diagnostics, and a check
that the answers are right.

No real InternVL weights exist here; the toy model is InternVL2.5's architecture at toy size,
trained on generated scenes of coloured shapes, so its answers show that the whole path
(checkpoint -> export -> node -> DDS -> answer) delivers the right picture to the model.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import rclpy

from internvl_ros.bags import write_bag
from internvl_ros.client import Client
from internvl_toy.scenes import Shape, moving_clip, render

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models" / "internvl-toy"
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent
FPS = 10.0
WINDOW_S = 3.0  # video.window_s: longer than the 2.4 s clip
QUESTIONS = [
    ("image", "What color is the shape?", "red"),
    ("image", "What shape is it?", "circle"),
    ("image", "How many shapes are there?", "one"),
    ("video", "Which way does the circle move?", "right"),
]


def show(cmd) -> list[str]:
    cmd = [str(c) for c in cmd]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    return cmd


def ask(mode: str, question: str) -> str:
    run = subprocess.run(
        show([BIN / "internvl-ask", "--mode", mode, "-q", question]),
        stdout=subprocess.PIPE,
        text=True,
    )
    print(run.stdout, end="", flush=True)
    answer = next(
        (
            line.split(">>", 1)[1].strip()
            for line in run.stdout.splitlines()
            if line.startswith("answer")
        ),
        "",
    )
    return answer if run.returncode == 0 else f"(internvl-ask failed: {run.returncode})"


def wait_for_a_frame(topic: str = "/image_raw", timeout_s: float = 60.0) -> None:
    """Asked before the node holds a frame, a question is answered "no fresh camera frame", rightly
    but not what the demo shows: wait until the node's heartbeat on /diagnostics counts one (what
    ``ros2 topic echo /diagnostics`` shows a user)."""
    print(f"\n(waiting for the node's heartbeat to count a frame on {topic})", flush=True)
    rclpy.init()
    client = Client()
    try:
        client.wait_for(
            lambda: client.frames_received(topic) > 0,
            timeout_s,
            f"the node's first frame on {topic}",
        )
    except TimeoutError as e:  # the questions go on, and their answers say what the node lacks
        print(f"({e})", flush=True)
    finally:
        client.close()
        rclpy.try_shutdown()


def main() -> int:
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    model, still_bag, clip_bag = WORK / "toy_onnx", WORK / "still_bag", WORK / "clip_bag"
    manifest = model / "manifest.json"
    if (
        not manifest.is_file()
        or manifest.stat().st_mtime < (TOY / "model.safetensors").stat().st_mtime
    ):
        subprocess.run(
            show([BIN / "internvl-export", "--hf-model", TOY, "--out", model]), check=True
        )
    if not still_bag.exists():
        picture = render([Shape("circle", "red", 0.5, 0.5, 0.25)])
        write_bag(still_bag, [(i / FPS, picture) for i in range(10)])
        print(f"\nwrote a 1 s camera recording of a red circle to {still_bag}")
    if not clip_bag.exists():
        clip = moving_clip("circle", "red", "right", frames=24)
        write_bag(clip_bag, [(i / FPS, frame) for i, frame in enumerate(clip)])
        print(f"wrote a {len(clip) / FPS:.1f} s clip of a red circle moving right to {clip_bag}")

    node = subprocess.Popen(
        show(
            [
                BIN / "internvl_node",
                "--ros-args",
                "--params-file",
                ROOT / "config" / "internvl.yaml",
                "-p",
                f"model_dir:={model}",
                "-p",
                "max_new_tokens:=8",
                "-p",
                f"video.window_s:={WINDOW_S}",
                "-p",
                "max_frame_age_s:=5.0",
            ]
        )
    )
    answers = []
    try:
        # --wait-for-subscribers: frames published before the node has matched the player are lost.
        play = [BIN / "internvl-play-bag", "--restamp", "--wait-for-subscribers", "30"]
        # Image mode: the camera keeps showing the red circle.
        camera = subprocess.Popen(show([*play, still_bag, "--loop"]), stdout=subprocess.DEVNULL)
        wait_for_a_frame()
        answers += [ask(mode, q) for mode, q, _ in QUESTIONS if mode == "image"]
        camera.send_signal(2)
        camera.wait(20)
        # Video mode: the clip played once; the node keeps the camera's last video.window_s seconds,
        # so the question sees the whole clip as long as its last frame is fresh (max_frame_age_s).
        time.sleep(WINDOW_S)  # the still picture leaves the window
        subprocess.run(show([*play, clip_bag]), check=True, stdout=subprocess.DEVNULL)
        answers += [ask(mode, q) for mode, q, _ in QUESTIONS if mode == "video"]
    finally:
        node.send_signal(2)
        node.wait(20)
    print("\n| mode | question | answer | expected |\n|---|---|---|---|")
    wrong = 0
    for (mode, question, expected), answer in zip(QUESTIONS, answers):
        wrong += answer != expected
        print(
            f"| {mode} | {question} | {answer} | "
            f"{expected}{'' if answer == expected else '  <- WRONG'} |"
        )
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
