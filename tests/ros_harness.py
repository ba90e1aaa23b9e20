"""Real rclpy over real DDS for the node tests: the node runs as its own process, started the way
launch/internvl.launch.py starts it; the test side is an ordinary rclpy node."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
ERROR = "ERROR: "


def node_command(model_dir: Path, params: dict | None = None, namespace: str = "",
                 remaps: dict | None = None) -> list[str]:
    """The command launch_ros builds for internvl.launch.py: the package's parameter file, then
    overrides, the node name, namespace and remappings."""
    cmd = [str(BIN / "internvl_node"), "--ros-args", "-r", "__node:=internvl",
           "--params-file", str(ROOT / "config" / "internvl.yaml"), "-p", f"model_dir:={model_dir}"]
    for key, value in (params or {}).items():
        cmd += ["-p", f"{key}:={value}"]
    if namespace:
        cmd += ["-r", f"__ns:={namespace}"]
    for src, dst in (remaps or {}).items():
        cmd += ["-r", f"{src}:={dst}"]
    return cmd


class NodeProcess:
    def __init__(self, model_dir: Path, log_path: Path, **kwargs):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(node_command(model_dir, **kwargs), stdout=self._log, stderr=subprocess.STDOUT)

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


class Client:
    """The test's side of the wire: asks questions, sends frames, records everything the node says."""

    def __init__(self, namespace: str = "", node_name: str = "internvl"):
        self.node = rclpy.create_node("internvl_test_client", namespace=namespace or None)
        self.lock = threading.RLock()  # predicates given to wait_for may take it again
        self.answers: list[str] = []
        self.chunks: list[str] = []
        self.statuses: list = []  # per-answer DiagnosticStatus
        self.heartbeats: list = []
        self.node.create_subscription(String, "answer", lambda m: self._add(self.answers, m.data), RELIABLE)
        self.node.create_subscription(String, "answer/stream", lambda m: self._add(self.chunks, m.data), RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RELIABLE)
        self.questions = self.node.create_publisher(String, "question", RELIABLE)
        self._image_pubs = {}
        prefix = f"{namespace.rstrip('/')}/{node_name}" if namespace else f"/{node_name}"
        self.set_params = self.node.create_client(SetParameters, f"{prefix}/set_parameters")
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._spinning = True
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self):
        while self._spinning:
            self.executor.spin_once(timeout_sec=0.05)

    def _add(self, target, value):
        with self.lock:
            target.append(value)

    def _on_diagnostics(self, msg):
        with self.lock:
            for s in msg.status:
                (self.heartbeats if s.name.endswith("heartbeat") else self.statuses).append(s)

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; answers so far: {self.answers[-5:]}")

    def wait_ready(self, timeout: float = 60.0):
        """The node is up when its heartbeat arrives and it subscribes to our questions."""
        self.wait_for(lambda: self.heartbeats and self.questions.get_subscription_count() > 0, timeout, "the node")

    def ask(self, text: str) -> None:
        self.questions.publish(String(data=text))

    def ask_and_wait(self, text: str, timeout: float = 60.0) -> str:
        with self.lock:
            n = len(self.answers)
        self.ask(text)
        self.wait_for(lambda: len(self.answers) > n, timeout, f"an answer to {text!r}")
        with self.lock:
            return self.answers[n]

    def send_image(self, topic: str, msg, subscribers: int = 1) -> None:
        if topic not in self._image_pubs:
            cls = CompressedImage if isinstance(msg, CompressedImage) else Image
            self._image_pubs[topic] = self.node.create_publisher(cls, topic, RELIABLE)
        pub = self._image_pubs[topic]
        self.wait_for(lambda: pub.get_subscription_count() >= subscribers, 30, f"a subscriber on {topic}")
        msg.header.stamp = self.node.get_clock().now().to_msg()
        pub.publish(msg)

    def set_parameter(self, name: str, value) -> bool:
        assert self.set_params.wait_for_service(30), "parameter service of the node not found"
        pv = ParameterValue()
        if isinstance(value, bool):
            pv.type, pv.bool_value = ParameterType.PARAMETER_BOOL, value
        elif isinstance(value, int):
            pv.type, pv.integer_value = ParameterType.PARAMETER_INTEGER, value
        elif isinstance(value, float):
            pv.type, pv.double_value = ParameterType.PARAMETER_DOUBLE, value
        else:
            pv.type, pv.string_value = ParameterType.PARAMETER_STRING, value
        future = self.set_params.call_async(SetParameters.Request(parameters=[Parameter(name=name, value=pv)]))
        deadline = time.monotonic() + 30
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        return future.result().results[0].successful

    def status_values(self, status) -> dict:
        return {kv.key: kv.value for kv in status.values}

    def close(self):
        self._spinning = False
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()


def image_msg(rgb, encoding: str, padding: int = 0, big_endian: bool = False) -> Image:
    """A sensor_msgs/Image of an RGB array in ``encoding``, optionally with row padding."""
    import numpy as np

    from internvl_ros.image_msgs import rgb_to_pixels

    pixels = rgb_to_pixels(rgb, encoding)
    if pixels.dtype == np.uint16:  # a low byte unlike the high one, so a byte-order mistake shows
        pixels = ((pixels & 0xFF00) | 0x3C).astype(">u2" if big_endian else "<u2")
    h, w = rgb.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(h, -1).view(np.uint8)
    rows = np.pad(rows, ((0, 0), (0, padding)), constant_values=77)
    return Image(height=h, width=w, encoding=encoding, is_bigendian=int(big_endian), step=rows.shape[1],
                 data=rows.tobytes())


def compressed_msg(rgb, fmt: str = "jpeg") -> CompressedImage:
    import cv2

    ok, data = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return CompressedImage(format=fmt, data=data.tobytes())
