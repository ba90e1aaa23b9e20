"""The internvl node: camera and question topics in, streamed answers and /diagnostics out.

Callbacks only store frames or enqueue questions; one worker thread owns the engine. Errors a
user must see go to ``answer`` prefixed with ``ERROR: ``, to /diagnostics at ERROR and to the log;
the node keeps serving.
"""
from __future__ import annotations

import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from internvl_engine import Engine, InternVLError, InvalidRequestError, Request

from . import params
from .cameras import Cameras, Frame, NoFreshFrameError, NotEnoughFramesError
from .image_msgs import ImageConversionError, to_rgb

ERROR_PREFIX = "ERROR: "
RELIABLE_DEPTH = 100  # a burst of questions (or of error answers) must not overrun the DDS history
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


@dataclass
class Job:
    id: int
    question: str
    received: float  # time.monotonic()
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""


class InternVLNode(Node):
    def __init__(self, **kwargs):
        super().__init__("internvl", **kwargs)
        params.declare(self)
        p = {name: self.get_parameter(name).value
             for name in ("model_dir", "hf_model", "vit_model", "backend", "provider", "resident_kv", "threads")}
        if not p["model_dir"]:
            raise InternVLError("parameter model_dir is not set (the internvl-export output directory)")
        self.engine = Engine(p["model_dir"], backend=p["backend"], threads=p["threads"] or None,
                             tokenizer_dir=p["hf_model"] or None, vit_model=p["vit_model"] or None,
                             provider=p["provider"] or None, resident_kv=p["resident_kv"])

        reliable = QoSProfile(depth=RELIABLE_DEPTH, reliability=ReliabilityPolicy.RELIABLE)
        self._stream_pub = self.create_publisher(String, "answer/stream", reliable)
        self._answer_pub = self.create_publisher(String, "answer", reliable)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        camera_qos = qos_profile_sensor_data if self.get_parameter("camera_qos").value == "sensor_data" else reliable
        subs = [self.create_subscription(CompressedImage if t.endswith("/compressed") else Image, t,
                                         partial(self._on_image, i), camera_qos)
                for i, t in enumerate(self.get_parameter("image_topics").value)]
        self.cameras = Cameras([s.topic_name for s in subs])
        self.create_subscription(String, "question", self._on_question, reliable)

        self._jobs: deque[Job] = deque()
        self._current: Job | None = None
        self._cv = threading.Condition()
        self._next_id = 1
        self._running = True
        self._worker = threading.Thread(target=self._work, name="internvl-worker", daemon=True)
        self._worker.start()
        self._last_beat = (time.monotonic(), self.cameras.counts())
        self.create_timer(self.get_parameter("heartbeat_period_s").value, self._heartbeat)
        self.get_logger().info(f"model {p['model_dir']} loaded on {self.engine.backend}; cameras: "
                               f"{', '.join(c.topic for c in self.cameras.cameras) or 'none'}")

    # --- callbacks: store or enqueue, nothing else ---------------------------------------------
    def _on_image(self, index: int, msg) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9 or self._now()
        self.cameras.add(index, Frame(self.cameras.cameras[index].topic, stamp, msg),
                         self.get_parameter("video.window_s").value,
                         self.get_parameter("video.max_buffered_frames").value)

    def _on_question(self, msg: String) -> None:
        policy = self.get_parameter("on_busy").value
        limit = self.get_parameter("queue_size").value
        cancelled: list[Job] = []
        with self._cv:
            job = Job(self._next_id, msg.data, time.monotonic())
            self._next_id += 1
            busy = self._current is not None or bool(self._jobs)
            refusal = None
            if policy == "drop" and busy:
                refusal = "busy: question dropped (on_busy=drop)"
            elif policy == "queue" and len(self._jobs) >= limit:
                refusal = f"queue full ({limit} waiting): question dropped"
            elif policy == "preempt":
                cancelled = list(self._jobs)
                self._jobs.clear()
                if self._current is not None:
                    self._current.cancel_reason = "preempted by a newer question"
                    self._current.cancel.set()
            if refusal is None:
                self._jobs.append(job)
                self._cv.notify()
        for old in cancelled:
            self._report_error(old, "cancelled: preempted by a newer question", level=WARN)
        if refusal is not None:
            self._report_error(job, refusal)

    # --- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                while self._running and not self._jobs:
                    self._cv.wait()
                if not self._running:
                    return
                job = self._current = self._jobs.popleft()
            try:
                self._serve(job)
            except Exception as e:  # a backend or unforeseen failure must not stop the node
                self._report_error(job, f"internal error: {type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._current = None

    def _serve(self, job: Job) -> None:
        info = {"queue_wait_ms": f"{(time.monotonic() - job.received) * 1e3:.1f}"}
        try:
            s = params.Settings.read(self)
            info["mode"] = s.mode
            if not job.question.strip():
                raise InvalidRequestError("the question is empty")
            now = self._now()
            if s.mode == "image":
                frames = self.cameras.latest_frames(now, s.max_frame_age_s, s.max_images)
            elif s.mode == "video":
                frames = self.cameras.clip(now, s.max_frame_age_s, s.num_frames)
            else:
                frames = []
            describe = lambda chosen: "; ".join(f"{f.topic}@{f.stamp:.3f} (age {now - f.stamp:.2f} s)"  # noqa: E731
                                                for f in chosen)
            info["frames"] = describe(frames)
            images = [self._convert(f) for f in frames]
            request = Request(job.question, images=images if s.mode == "image" else (),
                              video_frames=images if s.mode == "video" else (), max_tiles=s.max_tiles,
                              system_prompt=s.system_prompt)
            for item in self.engine.stream(request, s.generation, job.cancel):
                if isinstance(item, str):
                    self._stream_pub.publish(String(data=item))
                else:
                    answer = item
        except (InternVLError, NoFreshFrameError, NotEnoughFramesError, ImageConversionError, ValueError) as e:
            self._report_error(job, str(e), info)
            return
        t = answer.timings
        info.update(vit_ms=", ".join(f"{ms:.1f}" for ms in t.vit_ms), prefill_tokens=str(t.prefill_tokens),
                    reused_tokens=str(t.reused_tokens), ttft_ms=f"{t.ttft_ms:.1f}", decode_tokens_per_s=f"{t.decode_tokens_per_s:.2f}",
                    decode_ms_per_token=f"{t.decode_ms_per_token:.2f}",
                    decode_bytes_per_token=f"{t.decode_bytes_per_token:.0f}", generated_tokens=str(len(answer.token_ids)),
                    finish_reason=answer.finish_reason)
        if answer.finish_reason == "cancelled":
            self._report_error(job, f"cancelled: {job.cancel_reason or 'stopped'}", info, level=WARN)
            return
        self._answer_pub.publish(String(data=answer.text))
        if t.frames_dropped:  # the model build's prompt limit holds fewer frames than video.num_frames
            info.update(frames=describe([frames[i] for i in answer.frames_used]), frames_dropped=str(t.frames_dropped))
            message = (f"answered from {len(answer.frames_used)} of {len(frames)} frames: more do not fit the model "
                       f"build's prompt limit (lower video.num_frames, or build for longer prompts)")
            self.get_logger().warning(f"request {job.id}: {message}")
            self._diagnose(job, WARN, message, info)
            return
        self._diagnose(job, OK, "answered", info)

    def _convert(self, frame: Frame):
        try:
            return to_rgb(frame.msg)
        except ImageConversionError as e:
            raise ImageConversionError(f"{frame.topic}: {e}") from None

    # --- reporting -----------------------------------------------------------------------------
    def _report_error(self, job: Job, message: str, info: dict | None = None, level=ERROR) -> None:
        line = f"request {job.id} ({job.question[:60]!r}): {message}"
        if level == ERROR:  # rclpy ties a severity to each logging call site, so two calls
            self.get_logger().error(line)
        else:
            self.get_logger().warning(line)
        self._answer_pub.publish(String(data=ERROR_PREFIX + message))
        self._diagnose(job, level, message, info or {})

    def _diagnose(self, job: Job, level, message: str, info: dict) -> None:
        values = {"request_id": str(job.id), "question": job.question, "backend": self.engine.backend, **info}
        self._publish_status(DiagnosticStatus(
            level=level, name=f"{self.get_name()}: answer", message=message, hardware_id=self.get_fully_qualified_name(),
            values=[KeyValue(key=k, value=v) for k, v in values.items()]))

    def _heartbeat(self) -> None:
        now, counts = time.monotonic(), self.cameras.counts()
        then, before = self._last_beat
        self._last_beat = (now, counts)
        with self._cv:
            queued, busy = len(self._jobs), self._current is not None
        values = {"model_loaded": "true", "backend": self.engine.backend, "queue_length": str(queued),
                  "busy": str(busy).lower(), "mode": self.get_parameter("mode").value}
        for topic, count in counts.items():
            values[f"frames_received {topic}"] = str(count)
            values[f"rate_hz {topic}"] = f"{(count - before.get(topic, 0)) / max(now - then, 1e-9):.2f}"
        self._publish_status(DiagnosticStatus(
            level=OK, name=f"{self.get_name()}: heartbeat", message="busy" if busy else "idle",
            hardware_id=self.get_fully_qualified_name(), values=[KeyValue(key=k, value=v) for k, v in values.items()]))

    def _publish_status(self, status: DiagnosticStatus) -> None:
        self._diag_pub.publish(DiagnosticArray(header=self._header(), status=[status]))

    def _header(self) -> Header:
        return Header(stamp=self.get_clock().now().to_msg())

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def shutdown(self) -> None:
        with self._cv:
            self._running = False
            if self._current is not None:
                self._current.cancel.set()
            unanswered = list(self._jobs)
            self._jobs.clear()
            self._cv.notify_all()
        self._worker.join(timeout=10)
        if unanswered:  # the DDS context may be gone already, so the log is where these are reported
            self.get_logger().warning(f"shutting down with {len(unanswered)} unanswered question(s): "
                                      + "; ".join(repr(j.question[:60]) for j in unanswered))


def main(args=None) -> int:
    rclpy.init(args=args)
    try:
        node = InternVLNode()
    except InternVLError as e:
        rclpy.logging.get_logger("internvl").fatal(f"cannot start: {e}")
        rclpy.try_shutdown()
        return 1
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # ros2 launch without a TTY forwards a SIGINT the process group already got: a second one must
        # not cut the clean-up short with a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        node.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
