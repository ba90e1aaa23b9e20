"""Node overhead figures (prints them, with the CPU; asserts nothing). With the workspace sourced:

    source ros2_ws/install/setup.bash
    .venv/bin/internvl-make-tiny --out /tmp/tiny
    .venv/bin/internvl-export --hf-model /tmp/tiny --out /tmp/tiny_onnx
    .venv/bin/python scripts/bench_node.py --model-dir /tmp/tiny_onnx [--questions 20] [--idle-s 10]

1. Question -> first streamed chunk, seen by a client over DDS, minus the engine's own TTFT and
   ViT time from the answer's diagnostics: what the node and DDS add (text and image mode).
2. Node CPU while idle: with no camera, and with a 30 Hz camera of 1080p rgb8 frames (measured
   from /proc/<pid>/stat over --idle-s seconds; the publisher runs in this process, not the node's).
   The camera publishes reliable, so the node's camera_qos (auto by default) subscribes reliable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from sensor_msgs.msg import Image

from internvl_engine.tools.bench import machine
from internvl_ros.client import RELIABLE, Client
from internvl_ros.params import CAMERA_QOS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_chunk_overhead(client: Client, question: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        with client.lock:
            chunks, statuses = len(client.chunks), len(client.statuses)
        t0 = time.perf_counter()
        client.ask(question)
        client.wait_for(lambda: len(client.chunks) > chunks, 30, "first chunk")
        first_ms = (time.perf_counter() - t0) * 1e3
        client.wait_for(lambda: len(client.statuses) > statuses, 60, "status")
        v = client.status_values(client.statuses[statuses])
        engine_ms = float(v["ttft_ms"]) + sum(float(x) for x in v["vit_ms"].split(", ") if x)
        out.append(first_ms - engine_ms)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument(
        "--camera-qos", choices=CAMERA_QOS, default="auto", help="the node's camera_qos"
    )
    args = ap.parse_args()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    node = subprocess.Popen(
        [
            str(BIN / "internvl_node"),
            "--ros-args",
            "--params-file",
            str(ROOT / "config/internvl.yaml"),
            "-p",
            f"model_dir:={args.model_dir}",
            "-p",
            "max_new_tokens:=4",
            "-p",
            "max_frame_age_s:=5.0",
            "-p",
            f"camera_qos:={args.camera_qos}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rclpy.init()
    client = Client()
    print(machine())
    try:
        client.wait_ready()
        assert client.set_parameter("mode", "text")
        text = first_chunk_overhead(client, "How far is the door?", args.questions)
        print(
            "question -> first chunk minus engine TTFT, text mode: median "
            f"{statistics.median(text):.2f} ms "
            f"(min {min(text):.2f}, max {max(text):.2f}, n={len(text)})"
        )

        t0, c0 = time.monotonic(), cpu_seconds(node.pid)
        time.sleep(args.idle_s)
        idle_none = (cpu_seconds(node.pid) - c0) / (time.monotonic() - t0)

        frame = Image(
            height=1080,
            width=1920,
            encoding="rgb8",
            step=1920 * 3,
            data=np.random.default_rng(0)
            .integers(0, 256, 1920 * 1080 * 3, dtype=np.uint8)
            .tobytes(),
        )
        pub = client.node.create_publisher(Image, "image_raw", RELIABLE)
        stop = threading.Event()

        def camera():
            period, next_t = 1 / 30, time.monotonic()
            while not stop.is_set():
                frame.header.stamp = client.node.get_clock().now().to_msg()
                pub.publish(frame)
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))

        thread = threading.Thread(target=camera)
        thread.start()
        time.sleep(2.0)
        with client.lock:
            beats0 = len(client.heartbeats)
        t0, c0 = time.monotonic(), cpu_seconds(node.pid)
        time.sleep(args.idle_s)
        idle_cam = (cpu_seconds(node.pid) - c0) / (time.monotonic() - t0)
        with client.lock:
            rate = client.status_values(client.heartbeats[-1]).get("rate_hz /image_raw", "?")
        assert len(client.heartbeats) > beats0
        assert client.set_parameter("mode", "image")
        image = first_chunk_overhead(client, "What is in front of me?", args.questions)
        stop.set()
        thread.join()
        print(
            f"question -> first chunk minus engine TTFT and ViT, image mode (1080p frame): median "
            f"{statistics.median(image):.2f} ms (min {min(image):.2f}, max {max(image):.2f})"
        )
        print(
            f"node CPU while idle: no camera {100 * idle_none:.1f} % of a core; 30 Hz 1080p rgb8 "
            "camera "
            f"{100 * idle_cam:.1f} % of a core (frames received at {rate} Hz)"
        )
    finally:
        client.close()
        rclpy.try_shutdown()
        node.send_signal(2)
        node.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
