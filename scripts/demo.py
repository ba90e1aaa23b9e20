"""The demo behind ``make demo``: the ROS 2 node on the trained toy checkpoint (models/internvl-toy),
a generated clip of a red circle moving right played as a camera, questions in image mode and in
video mode, streamed answers and diagnostics, and a check that the answers are right.

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

from internvl_ros.bags import write_bag
from internvl_toy.scenes import moving_clip

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "models" / "internvl-toy"
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent
FPS = 10.0
QUESTIONS = [("image", "What color is the shape?", "red"), ("image", "What shape is it?", "circle"),
             ("image", "How many shapes are there?", "one"), ("video", "Which way does the circle move?", "right")]


def show(cmd) -> list[str]:
    cmd = [str(c) for c in cmd]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    return cmd


def ask(mode: str, question: str) -> str:
    run = subprocess.run(show([BIN / "internvl-ask", "--mode", mode, "-q", question]), stdout=subprocess.PIPE,
                         text=True)
    print(run.stdout, end="", flush=True)
    answer = next((line.split(">>", 1)[1].strip() for line in run.stdout.splitlines()
                   if line.startswith("answer")), "")
    return answer if run.returncode == 0 else f"(internvl-ask failed: {run.returncode})"


def main() -> int:
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    model, bag = WORK / "toy_onnx", WORK / "clip_bag"
    manifest = model / "manifest.json"
    if not manifest.is_file() or manifest.stat().st_mtime < (TOY / "model.safetensors").stat().st_mtime:
        subprocess.run(show([BIN / "internvl-export", "--hf-model", TOY, "--out", model]), check=True)
    if not bag.exists():
        clip = moving_clip("circle", "red", "right", frames=24)
        write_bag(bag, [(i / FPS, frame) for i, frame in enumerate(clip)])
        print(f"\nwrote a {len(clip) / FPS:.1f} s clip of a red circle moving right to {bag}")

    node = subprocess.Popen(show([BIN / "internvl_node", "--ros-args", "--params-file", ROOT / "config" / "internvl.yaml",
                                  "-p", f"model_dir:={model}", "-p", "max_new_tokens:=8", "-p", "video.window_s:=3.0",
                                  "-p", "max_frame_age_s:=5.0"]))  # internvl-ask takes a moment to start
    answers = []
    try:
        # --wait-for-subscribers: frames published before the node has matched the player are lost.
        play = [BIN / "internvl-play-bag", bag, "--restamp", "--wait-for-subscribers", "20"]
        # Image mode: the camera loops the clip; any frame shows one red circle.
        camera = subprocess.Popen(show([*play, "--loop"]), stdout=subprocess.DEVNULL)
        answers += [ask(mode, q) for mode, q, _ in QUESTIONS if mode == "image"]
        camera.send_signal(2)
        camera.wait(20)
        # Video mode: the clip played once (a loop would jump back to the left), then asked at once.
        time.sleep(3.0)  # older frames leave the 3 s window
        subprocess.run(show(play), check=True, stdout=subprocess.DEVNULL)
        answers += [ask(mode, q) for mode, q, _ in QUESTIONS if mode == "video"]
    finally:
        node.send_signal(2)
        node.wait(20)
    print("\n| mode | question | answer | expected |\n|---|---|---|---|")
    wrong = 0
    for (mode, question, expected), answer in zip(QUESTIONS, answers):
        wrong += answer != expected
        print(f"| {mode} | {question} | {answer} | {expected}{'' if answer == expected else '  <- WRONG'} |")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
