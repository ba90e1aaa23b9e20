"""Talking to the internvl node from Python or the shell (for machines without the ros2 CLI).

``internvl-ask -q "What is in front of me?" [--mode video]`` publishes a question, prints the
streamed answer as it arrives, then the answer's /diagnostics status.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from .node import ERROR_PREFIX, RELIABLE_DEPTH
from .params import MODES

RELIABLE = QoSProfile(depth=RELIABLE_DEPTH, reliability=ReliabilityPolicy.RELIABLE)


class Client:
    """Asks questions, sends frames, sets parameters and records everything the node says
    (answers, stream chunks, per-answer statuses, heartbeats), spinning in its own thread."""

    def __init__(self, namespace: str = "", node_name: str = "internvl"):
        self.node = rclpy.create_node("internvl_client", namespace=namespace or None)
        self.lock = threading.RLock()  # predicates given to wait_for may take it again
        self._changed = threading.Condition(self.lock)
        self.answers: list[str] = []
        self.chunks: list[str] = []
        self.statuses: list = []  # per-answer DiagnosticStatus
        self.heartbeats: list = []
        self.node.create_subscription(String, "answer", lambda m: self._add(self.answers, m.data), RELIABLE)
        self.node.create_subscription(String, "answer/stream", lambda m: self._add(self.chunks, m.data), RELIABLE)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RELIABLE)
        self.questions = self.node.create_publisher(String, "question", RELIABLE)
        self._image_pubs = {}
        self.node_fqn = f"{namespace.rstrip('/')}/{node_name}" if namespace else f"/{node_name}"
        self.set_params = self.node.create_client(SetParameters, f"{self.node_fqn}/set_parameters")
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
            self._changed.notify_all()

    def _on_diagnostics(self, msg):
        with self.lock:
            for s in msg.status:
                if s.hardware_id != self.node_fqn:  # another node's diagnostics
                    continue
                (self.heartbeats if s.name.endswith("heartbeat") else self.statuses).append(s)
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        """Block until ``predicate()`` (called under the lock) is true, or raise TimeoutError."""
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise TimeoutError(f"timed out waiting for {what}; answers so far: {self.answers[-5:]}")

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

    def send_image(self, topic: str, msg, subscribers: int = 1, stamp: bool = True) -> None:
        """Publish a camera frame, stamped now (``stamp=False`` keeps the message's own stamp)."""
        if topic not in self._image_pubs:
            cls = CompressedImage if isinstance(msg, CompressedImage) else Image
            self._image_pubs[topic] = self.node.create_publisher(cls, topic, RELIABLE)
        pub = self._image_pubs[topic]
        self.wait_for(lambda: pub.get_subscription_count() >= subscribers, 30, f"a subscriber on {topic}")
        if stamp:
            msg.header.stamp = self.node.get_clock().now().to_msg()
        pub.publish(msg)

    def set_parameter(self, name: str, value) -> bool:
        if not self.set_params.wait_for_service(30):
            raise TimeoutError("parameter service of the node not found")
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
        if not future.done():
            raise TimeoutError(f"the node did not answer setting {name}")
        return future.result().results[0].successful

    def status_values(self, status) -> dict:
        return {kv.key: kv.value for kv in status.values}

    def close(self):
        self._spinning = False
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="internvl-ask", description="Ask the internvl node a question and stream the answer.")
    ap.add_argument("-q", "--question", required=True)
    ap.add_argument("--mode", choices=MODES, help="set the node's mode first")
    ap.add_argument("--namespace", default="", help="the node's namespace")
    ap.add_argument("--node-name", default="internvl")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the node and the answer")
    args = ap.parse_args(argv)
    rclpy.init()
    client = Client(args.namespace, args.node_name)
    try:
        client.wait_ready(args.timeout)
        if args.mode and not client.set_parameter("mode", args.mode):
            print(f"internvl-ask: error: the node refused mode {args.mode!r}", file=sys.stderr)
            return 2
        printed = 0

        def show_new_chunks():
            nonlocal printed
            with client.lock:
                new = client.chunks[printed:]
                printed += len(new)
            for chunk in new:
                print(chunk, end="", flush=True)

        with client.lock:
            seen = len(client.statuses)
        print(f"question >> {args.question}\nanswer   >> ", end="", flush=True)
        client.ask(args.question)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and len(client.statuses) <= seen:
            show_new_chunks()
            time.sleep(0.02)
        show_new_chunks()
        if len(client.statuses) <= seen:
            print(f"\ninternvl-ask: error: no answer within {args.timeout:g} s", file=sys.stderr)
            return 2
        answer, status = client.answers[-1], client.statuses[seen]
        if answer.startswith(ERROR_PREFIX):
            print(answer, end="")
        print("\n/diagnostics:")
        for key, value in client.status_values(status).items():
            print(f"  {key}: {value}")
        return 1 if answer.startswith(ERROR_PREFIX) else 0
    except TimeoutError as e:
        print(f"internvl-ask: error: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
        rclpy.try_shutdown()
