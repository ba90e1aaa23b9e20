"""Talking to the internvl node from Python or the shell.

``AskClient`` is what a behaviour tree or a nav2_simple_commander script calls: one blocking
``ask(question, choices=..., timeout=...)`` through the node's ``ask`` action, returning the typed
answer (the chosen choice and its probability, or the error code and why). ``Client`` speaks the
plain topics (question in, answer and stream out, /diagnostics) and records everything the node
says; the tests use it. Both spin their own node in a background thread, so a script needs no
executor of its own.

``internvl-ask -q "What is in front of me?" [--mode video] [--choices yes,no] [--cameras
front/image_raw] [--max-new-tokens 32] [--action]`` asks from the shell and prints the streamed
answer and its status.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass

import rclpy
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.task import Future
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from .interface import ANSWER_QOS, ERROR_PREFIX, QUESTION_QOS

try:
    from internvl_msgs.action import Ask
    from internvl_msgs.msg import Answer as AnswerMsg
    from internvl_msgs.msg import AnswerChunk
except ImportError as e:
    raise ImportError(
        f"{e}: the client needs the internvl_msgs interface package: build the workspace (make ws, "
        "or colcon build in ros2_ws) and source its install/setup.bash"
    ) from e

RELIABLE = ANSWER_QOS
STATUS_NAMES = {
    GoalStatus.STATUS_SUCCEEDED: "succeeded",
    GoalStatus.STATUS_ABORTED: "aborted",
    GoalStatus.STATUS_CANCELED: "canceled",
}
ERROR_NAMES = {
    getattr(AnswerMsg, n): n
    for n in dir(AnswerMsg)
    if n.isupper() and isinstance(getattr(AnswerMsg, n), int)
}


class _Spinner:
    """A node of our own, spun in a background thread once ``start()`` is called. Create the node's
    publishers, subscriptions and clients before: kilted's rclpy ActionClient adds itself to the
    node before it has its lock, and a thread spinning the node then dies on it."""

    def __init__(self, name: str, namespace: str = ""):
        self.node = rclpy.create_node(name, namespace=namespace or None)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self._spinning = True
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def start(self):
        self._thread.start()

    def call(self, fn) -> Future:
        """Run ``fn()`` on the spinning thread. Its result, or the exception it raises, comes in the
        returned future: let into the executor, an exception would end the spinning thread."""
        done = Future()

        def run():
            try:
                done.set_result(fn())
            except Exception as e:
                done.set_exception(e)

        self.executor.create_task(run)
        return done

    def _spin(self):
        try:
            while self._spinning:
                self.executor.spin_once(timeout_sec=0.05)
        except ExternalShutdownException:  # rclpy's signal handler shut ROS down (Ctrl-C, SIGTERM)
            pass

    def close(self, *entities):
        """Stop spinning, then destroy ``entities`` (those the node does not destroy itself) and the
        node: not while a thread spins them."""
        self._spinning = False
        self._thread.join(5)
        self.executor.shutdown()
        for entity in entities:
            entity.destroy()
        self.node.destroy_node()


def check_timeout(timeout: float) -> None:
    if not (timeout > 0 and math.isfinite(timeout)):  # NaN would wait for ever
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout:g}")


def check_sendable(text: str, what: str) -> None:
    """A ROS string ends at its first NUL character: refuse text that would arrive cut short."""
    if "\0" in text:
        raise ValueError(
            f"{what} holds a NUL character, where a ROS string ends: the rest would be lost "
            f"({text!r})"
        )


def wait_future(future, timeout: float):
    """Block until an rclpy future (completed by the spinning thread) is done; None on timeout."""
    deadline = time.monotonic() + timeout
    while not future.done():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)
    return future.result()


@dataclass
class AskResult:
    """How a question asked through the action ended."""

    status: str  # succeeded | aborted | canceled | rejected | timeout | unavailable
    answer: AnswerMsg | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def text(self) -> str:
        return self.answer.text if self.answer else ""

    @property
    def choice(self) -> str | None:
        """The chosen choice (the answer's text), or None without choices or on error."""
        return self.answer.text if self.answer and self.answer.choice_index >= 0 else None

    @property
    def probabilities(self) -> list[float]:
        return list(self.answer.choice_probabilities) if self.answer else []

    @property
    def boxes(self) -> list:
        """The places the answer names (internvl_msgs/Box, in pixels of
        ``answer.frames[box.frame]``)."""
        return list(self.answer.boxes) if self.answer else []

    @property
    def error(self) -> str:
        """Why it did not succeed: the node's error code and message, or the client's view."""
        if self.answer is not None and self.answer.error_code != AnswerMsg.NONE:
            code = ERROR_NAMES.get(self.answer.error_code, self.answer.error_code)
            return f"{code}: {self.answer.error_msg}"
        return "" if self.ok else self.status


class _FeedbackStream:
    """Hands a goal's feedback to ``on_chunk``, then, once the result is in, whatever of the answer
    the feedback did not bring: the result and the feedback travel apart, and rclpy drops feedback
    that arrives after the result, so the last chunks of a fast answer can be lost on the way.

    An error that ``on_chunk`` raises on the spinning thread ends the stream and is raised again by
    ``close()``, on the asking thread: let through, it would end the spinning thread, and every
    later question of the client would wait out its timeout."""

    def __init__(self, on_chunk):
        self.on_chunk, self.text, self.closed, self.error = on_chunk, "", False, None
        # feedback comes on the spinning thread, the result on the caller's
        self.lock = threading.Lock()

    def __call__(self, msg) -> None:
        with self.lock:
            if not self.closed and self.error is None:
                self.text += msg.feedback.text
                try:
                    self.on_chunk(msg.feedback.text)
                except Exception as e:
                    self.error = e

    def close(self, answer: str) -> None:
        with self.lock:
            self.closed = True
            if self.error is not None:
                raise self.error
            if len(answer) > len(self.text) and answer.startswith(self.text):
                self.on_chunk(answer[len(self.text) :])


class AskClient:
    """Blocking questions through the node's ``ask`` action (internvl_msgs/action/Ask).

    rclpy.init()
    vision = AskClient(namespace="/robot")
    result = vision.ask("Is the door open?", choices=["yes", "no"], timeout=30)
    if result.ok and result.choice == "yes":
        ...
    """

    def __init__(self, namespace: str = "", action: str = "ask"):
        self._spinner = _Spinner("internvl_ask_client", namespace)
        self.node = self._spinner.node
        # the node keeps an answer's feedback as its answer topics do: a fast answer's chunks all
        # arrive
        self._action = ActionClient(self.node, Ask, action, feedback_sub_qos_profile=ANSWER_QOS)
        self._goal = None  # the goal being asked, once accepted
        self._asking = False
        self._cancel_wanted = False  # cancel() came before the goal's acceptance
        self._goal_lock = threading.Lock()
        self._spinner.start()

    def wait_for_server(self, timeout: float = 30.0) -> bool:
        return self._action.wait_for_server(timeout_sec=timeout)

    def ask(
        self,
        question: str = "",
        *,
        ground: str = "",
        choices=(),
        mode: str = "",
        cameras=(),
        max_new_tokens: int = 0,
        timeout: float = 60.0,
        on_chunk=None,
    ) -> AskResult:
        """Ask and wait up to ``timeout`` seconds (then the goal is cancelled). ``on_chunk(text)``
        sees the answer's pieces as they stream; an error it raises ends them, and comes out of
        ask() once the goal has ended. ``ground`` (with no question): find this phrase; the result's
        ``boxes`` say where."""
        check_timeout(timeout)
        texts = [("the question", question), ("the phrase to ground", ground)]
        for what, text in [*texts, *(("a choice", c) for c in choices)]:
            check_sendable(text, what)
        deadline = time.monotonic() + timeout
        if not self._action.wait_for_server(timeout_sec=timeout):
            return AskResult("unavailable")
        goal = Ask.Goal(
            question=question,
            ground=ground,
            choices=list(choices),
            mode=mode,
            cameras=list(cameras),
            max_new_tokens=max_new_tokens,
        )
        stream = _FeedbackStream(on_chunk) if on_chunk else None
        with self._goal_lock:
            self._asking, self._cancel_wanted = True, False
        call = self._spinner.call(
            lambda: self._action.send_goal_async(goal, feedback_callback=stream)
        )
        try:
            sending = wait_future(call, max(0.0, deadline - time.monotonic()))
            handle = sending and wait_future(sending, max(0.0, deadline - time.monotonic()))
            if handle is None:
                return AskResult("timeout")
            if not handle.accepted:
                return AskResult("rejected")
            with self._goal_lock:
                self._goal, cancel_wanted = handle, self._cancel_wanted
            if cancel_wanted:
                self._spinner.call(handle.cancel_goal_async)
            result = self._request(handle.get_result_async, max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            # Ctrl-C: the node stops answering, rather than answer no one. The goal's feedback can
            # come before its acceptance does, so Ctrl-C may land while the handle is on its way.
            self._cancel_interrupted(call)
            raise
        finally:
            with self._goal_lock:
                self._goal, self._asking = None, False
        status = STATUS_NAMES.get(result.status, str(result.status)) if result else "timeout"
        if result is None:
            self._request(handle.cancel_goal_async, 10.0)
            result = self._request(handle.get_result_async, 10.0)  # the partial answer
        answer = result.result.answer if result else None
        if stream:
            stream.close(answer.text if answer else "")
        return AskResult(status, answer)

    def _cancel_interrupted(self, call) -> None:
        try:
            sending = wait_future(call, 1.0)
            handle = sending and wait_future(sending, 1.0)
            if handle is not None and handle.accepted:
                self._request(handle.cancel_goal_async, 1.0)
        except Exception:  # rclpy's own signal handler may have shut ROS down already
            pass

    def _request(self, send, timeout: float):
        """The response to the request that ``send()`` makes, or None after ``timeout`` seconds.

        The request is sent from the spinning thread, the one that takes the responses. rclpy's
        action client files a request's future only after sending the request (Humble), or files a
        second future after the first (kilted's rclpy 9.1): a response that the spinning thread
        takes in between goes to no future, and the caller waits for ever (ros2/rclpy#1123)."""
        deadline = time.monotonic() + timeout
        future = wait_future(self._spinner.call(send), timeout)
        return (
            None if future is None else wait_future(future, max(0.0, deadline - time.monotonic()))
        )

    def cancel(self) -> None:
        """Cancel the question being asked (from another thread); its ask() returns canceled. Its
        answer can start streaming before its acceptance reaches this client: a cancel then is sent
        on acceptance."""
        with self._goal_lock:
            goal = self._goal
            self._cancel_wanted = self._asking and goal is None
        if goal is not None:
            self._spinner.call(goal.cancel_goal_async)

    def close(self):
        self._spinner.close(self._action)


class Client:
    """Asks questions on the ``question`` topic, sends frames, sets parameters, and records
    everything the node says (answers, stream chunks, typed results and chunks, per-answer statuses,
    heartbeats)."""

    def __init__(self, namespace: str = "", node_name: str = "internvl"):
        self._spinner = _Spinner("internvl_client", namespace)
        self.node = node = self._spinner.node
        self.lock = threading.RLock()  # predicates given to wait_for may take it again
        self._changed = threading.Condition(self.lock)
        self.answers: list[str] = []
        self.chunks: list[str] = []
        self.results: list[AnswerMsg] = []
        self.typed_chunks: list[AnswerChunk] = []
        self.statuses: list = []  # per-answer DiagnosticStatus
        self.heartbeats: list = []
        node.create_subscription(
            String, "answer", lambda m: self._add(self.answers, m.data), RELIABLE
        )
        node.create_subscription(
            String, "answer/stream", lambda m: self._add(self.chunks, m.data), RELIABLE
        )
        node.create_subscription(
            AnswerMsg, "answer/result", lambda m: self._add(self.results, m), RELIABLE
        )
        node.create_subscription(
            AnswerChunk, "answer/chunks", lambda m: self._add(self.typed_chunks, m), RELIABLE
        )
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, RELIABLE)
        self.questions = node.create_publisher(String, "question", QUESTION_QOS)
        self._image_pubs = {}
        self.node_fqn = (
            f"{node.get_namespace().rstrip('/')}/{node_name}"  # rclpy makes "robot" "/robot"
        )
        self.set_params = node.create_client(SetParameters, f"{self.node_fqn}/set_parameters")
        self._spinner.start()

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
                so_far = f"; answers so far: {self.answers[-5:]}" if self.answers else ""
                raise TimeoutError(f"timed out waiting for {what}{so_far}")

    def wait_ready(self, timeout: float = 60.0):
        """The node is up when it is active and subscribes to our questions."""
        self.wait_for(
            lambda: (
                self.heartbeats
                and self.status_values(self.heartbeats[-1]).get("state") == "active"
                and self.questions.get_subscription_count() > 0
            ),
            timeout,
            f"{self.node_fqn} to be active",
        )

    def ask(self, text: str) -> None:
        check_sendable(text, "the question")
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
        self.wait_for(
            lambda: pub.get_subscription_count() >= subscribers, 30, f"a subscriber on {topic}"
        )
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
        response = wait_future(
            self.set_params.call_async(
                SetParameters.Request(parameters=[Parameter(name=name, value=pv)])
            ),
            30,
        )
        if response is None:
            raise TimeoutError(f"the node did not answer setting {name}")
        self.last_set_reason = response.results[0].reason
        return response.results[0].successful

    def status_values(self, status) -> dict:
        return {kv.key: kv.value for kv in status.values}

    def frames_received(self, topic: str) -> int:
        """How many frames the node's last heartbeat counts on camera ``topic`` (0 before a
        heartbeat)."""
        with self.lock:
            beats = list(self.heartbeats)
        return int(self.status_values(beats[-1]).get(f"frames_received {topic}", 0)) if beats else 0

    def close(self):
        self._spinner.close()


def _print_status(values: dict) -> None:
    print("\n/diagnostics:")
    for key, value in values.items():
        print(f"  {key}: {value}")


def ask_topic(args) -> int:
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
            seen, answered = len(client.statuses), len(client.answers)

        # the answer's final typed chunk is in, so its stream is too
        def streamed_to_the_end() -> bool:
            rid = client.status_values(client.statuses[seen]).get("request_id")
            return any(c.final and str(c.request_id) == rid for c in client.typed_chunks)

        print(f"question >> {args.question}\nanswer   >> ", end="", flush=True)
        client.ask(args.question)
        # the answer, its status on /diagnostics and its chunks travel on separate topics, in no set
        # order
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and (
            len(client.statuses) <= seen or len(client.answers) <= answered
        ):
            show_new_chunks()
            time.sleep(0.02)
        if len(client.statuses) <= seen or len(client.answers) <= answered:
            show_new_chunks()
            print(f"\ninternvl-ask: error: no answer within {args.timeout:g} s", file=sys.stderr)
            return 2
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not streamed_to_the_end():
            show_new_chunks()
            time.sleep(0.02)
        show_new_chunks()
        answer, status = client.answers[answered], client.statuses[seen]
        if answer.startswith(ERROR_PREFIX):
            print(answer, end="")
        _print_status(client.status_values(status))
        return 1 if answer.startswith(ERROR_PREFIX) else 0
    finally:
        client.close()


def ask_action(args) -> int:
    client = AskClient(args.namespace)
    try:
        asked = f"find {args.ground!r}" if args.ground else args.question
        print(f"question >> {asked}\nanswer   >> ", end="", flush=True)
        result = client.ask(
            args.question or "",
            ground=args.ground or "",
            choices=args.choices,
            mode=args.mode or "",
            cameras=args.cameras,
            max_new_tokens=args.max_new_tokens,
            timeout=args.timeout,
            on_chunk=lambda text: print(text, end="", flush=True),
        )
        if result.answer is None:
            print(
                f"\ninternvl-ask: error: {result.status} (is the node running, and active?)",
                file=sys.stderr,
            )
            return 2
        a = result.answer
        values = {
            "status": result.status,
            "request_id": a.request_id,
            "finish_reason": a.finish_reason,
        }
        if a.choice_index >= 0:
            values["choices"] = ", ".join(
                f"{c}: {p:.3f}" for c, p in zip(args.choices, a.choice_probabilities)
            )
        for box in a.boxes:
            frame = a.frames[box.frame] if box.frame < len(a.frames) else None
            values[f"box {box.label!r}"] = (
                f"x {box.x_min:.1f}..{box.x_max:.1f}, y {box.y_min:.1f}..{box.y_max:.1f} px of "
                + (f"{frame.topic} ({frame.width}x{frame.height})" if frame else "?")
            )
        for problem in a.box_problems:
            values.setdefault("not a box", []).append(problem)
        if "not a box" in values:
            values["not a box"] = "; ".join(values["not a box"])
        if not result.ok:
            print(f"{ERROR_PREFIX}{a.error_msg}", end="")
            values["error_code"] = ERROR_NAMES.get(a.error_code, a.error_code)
        values["frames"] = "; ".join(
            f"{f.topic}@{f.stamp.sec + f.stamp.nanosec * 1e-9:.3f}" for f in a.frames
        )
        values.update(
            prefill_tokens=a.timings.prefill_tokens,
            ttft_ms=f"{a.timings.ttft_ms:.1f}",
            decode_tokens_per_s=f"{a.timings.decode_tokens_per_s:.2f}",
        )
        _print_status(values)
        return 0 if result.ok else 1
    finally:
        client.close()
