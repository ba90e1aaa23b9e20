"""The internvl node: camera topics, the question topic and the Ask action in; answers out.

A managed (lifecycle) node, so nav2's lifecycle_manager can bring it up and down with a navigation
stack: configure loads the model, activate subscribes to the cameras and serves, deactivate stops
serving and drops the camera subscriptions, cleanup frees the model. With ``autostart`` (the
default) it configures and activates itself, as a plain node comes up.

Questions (std_msgs/String on ``question``) and goals (internvl_msgs/action/Ask on ``ask``) share
one queue and the ``on_busy`` policy. Callbacks only enqueue; one worker thread owns the engine.
Every question gets exactly one answer, whatever happens to it: the text on ``answer`` (or one line
starting ``ERROR: ``), an internvl_msgs/Answer on ``answer/result``, a status on /diagnostics and,
for a goal, its result; pieces stream on ``answer/stream`` (text) and ``answer/chunks`` (with the
request id, ending with a final one) and as the goal's feedback. A goal the node will not run (busy,
inactive) is accepted and aborted at once with the error code and the reason, because a ROS 2 goal
rejection carries no reason; a goal preempted by a newer question ends aborted with error_code
CANCELLED (ROS 2 lets a goal end canceled only when its client asked).
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

try:
    from internvl_msgs.action import Ask
    from internvl_msgs.msg import Answer as AnswerMsg
    from internvl_msgs.msg import AnswerChunk, UsedFrame
    from internvl_msgs.msg import Timings as TimingsMsg
except ImportError as e:
    raise ImportError(
        f"{e}: the node needs the internvl_msgs interface package: build the workspace (make ws, "
        "or "
        "colcon build in ros2_ws) and source its install/setup.bash"
    ) from e
from internvl_engine import (
    BackendError,
    Engine,
    ImageError,
    InternVLError,
    InvalidRequestError,
    ModelDirError,
    PromptTooLongError,
    Request,
    VideoError,
)
from internvl_engine.preprocess import segment_centre_indices
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from rclpy.time import Time
from std_msgs.msg import Header, String

from . import params
from .cameras import (
    CLOCK_AT_ZERO,
    Cameras,
    CameraSubscriber,
    CameraView,
    Frame,
    NoFreshFrameError,
    UnknownCameraError,
)
from .image_msgs import ImageConversionError, to_rgb

ERROR_PREFIX = "ERROR: "
# Questions keep every message until taken (a burst of 1000 reaches the node); answers, chunks and
# statuses keep up to this many unacknowledged ones per reader.
QUESTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
ANSWER_DEPTH = 1000
ANSWER_QOS = QoSProfile(
    depth=ANSWER_DEPTH, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE
)
OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


class InactiveError(InternVLError):
    """The node is not active, so it answers nothing."""


class BusyError(InternVLError):
    """The on_busy policy refused the question."""


class CancelledError(InternVLError):
    """The answer was stopped: preempted by a newer question, cancelled by its client, or the node
    stopped."""


# What each error is called in internvl_msgs/Answer (the first matching class wins).
ERROR_CODES = [
    (InactiveError, AnswerMsg.INACTIVE),
    (BusyError, AnswerMsg.BUSY),
    (CancelledError, AnswerMsg.CANCELLED),
    (UnknownCameraError, AnswerMsg.UNKNOWN_CAMERA),
    (NoFreshFrameError, AnswerMsg.NO_FRESH_FRAME),
    (PromptTooLongError, AnswerMsg.PROMPT_TOO_LONG),
    (InvalidRequestError, AnswerMsg.INVALID_QUESTION),
    (ImageError, AnswerMsg.INVALID_QUESTION),
    (VideoError, AnswerMsg.INVALID_QUESTION),
    (BackendError, AnswerMsg.BACKEND_FAILED),
    (ModelDirError, AnswerMsg.BACKEND_FAILED),
]  # a model that does not fit its manifest cannot run


def error_code(error: Exception) -> int:
    return next((code for kind, code in ERROR_CODES if isinstance(error, kind)), AnswerMsg.UNKNOWN)


@dataclass
class Job:
    """One question, from the topic or a goal, until its answer is out."""

    id: int
    question: str
    received: float  # time.monotonic()
    mode: str = ""  # empty: the mode parameter
    cameras: tuple[str, ...] = ()  # resolved camera topics (empty: all)
    choices: tuple[str, ...] = ()
    max_new_tokens: int = 0  # 0: the parameter
    goal: object = None  # the goal's ServerGoalHandle, for a goal
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    result: Future = field(default_factory=Future)  # the AnswerMsg, when it is out
    chunks: int = 0  # streamed so far
    info: dict = field(default_factory=dict)  # what /diagnostics reports about it


class InternVLNode(LifecycleNode):
    def __init__(self, command_line: Sequence[str] = (), **kwargs):
        super().__init__("internvl", **kwargs)
        # ParameterError: main() prints it and exits 1
        for warning in params.check_command_line(
            command_line,
            self.get_fully_qualified_name(),
            rclpy_parameters=self.get_parameters_by_prefix(""),
        ):
            self.get_logger().warning(warning)
        params.declare(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.engine: Engine | None = None
        self.cameras = Cameras([])
        self._subscriber: CameraSubscriber | None = None
        self._camera_check = None
        self._jobs: deque[Job] = deque()
        self._current: Job | None = None
        self._active = False
        self._state = "unconfigured"  # the lifecycle state, as ros2 lifecycle get names it
        self._cv = threading.Condition()
        self._next_id = 1
        self._running = True
        # Always there, so a question or goal in any state gets an answer, never silence.
        self._answer_pub = self.create_publisher(String, "answer", ANSWER_QOS)
        self._stream_pub = self.create_publisher(String, "answer/stream", ANSWER_QOS)
        self._result_pub = self.create_publisher(AnswerMsg, "answer/result", ANSWER_QOS)
        self._chunk_pub = self.create_publisher(AnswerChunk, "answer/chunks", ANSWER_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", ANSWER_QOS)
        self._questions = self.create_subscription(
            String, "question", self._on_question, QUESTION_QOS
        )
        self._goals = ReentrantCallbackGroup()
        self._action = ActionServer(
            self,
            Ask,
            "ask",
            execute_callback=self._execute_goal,
            goal_callback=lambda _: GoalResponse.ACCEPT,
            cancel_callback=self._cancel_goal,
            callback_group=self._goals,
            feedback_pub_qos_profile=ANSWER_QOS,
        )
        self._wake = self.create_guard_condition(
            lambda: None
        )  # resumes goals waiting for their answer
        self._last_beat = (time.monotonic(), {})
        self._graph_seen: dict[
            str, object
        ] = {}  # what the last heartbeat saw of each graph problem
        # Steady time, not the node's clock: with use_sim_time and nothing on /clock yet, ROS time
        # stands at 0 and its timers never fire; the heartbeat must still beat, and say so.
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._heartbeat_timer = self.create_timer(
            self.get_parameter("heartbeat_period_s").value, self._heartbeat, clock=self._steady
        )
        self._worker = threading.Thread(target=self._work, name="internvl-worker", daemon=True)
        self._worker.start()

    # --- lifecycle -----------------------------------------------------------------------------
    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure()
        except (
            Exception
        ) as e:  # rclpy's lifecycle would turn any other exception into a silent ERROR
            known = isinstance(e, InternVLError)
            self.configure_error = str(e) if known else f"internal error: {type(e).__name__}: {e}"
            self.get_logger().error(f"cannot configure: {self.configure_error}")
            return TransitionCallbackReturn.FAILURE
        self._state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        p = {name: self.get_parameter(name).value for name in params.PARAMETERS}
        if not p["model_dir"]:
            raise params.ParameterError(
                "model_dir: not set (the internvl-export output, or a Pulsar2 directory)"
            )
        topics = []
        for name in p["image_topics"]:
            try:
                topics.append(self.resolve_topic_name(name))
            except Exception as e:  # rclpy raises its name validation errors and RCLError
                raise params.ParameterError(
                    f"image_topics: {name!r} is not a valid topic name ({e})"
                ) from e
        if twice := sorted(
            {t for t in topics if topics.count(t) > 1}
        ):  # each frame would go in twice
            raise params.ParameterError(f"image_topics: {', '.join(twice)} named more than once")
        self.engine = Engine(
            p["model_dir"],
            backend=p["backend"],
            threads=p["threads"] or None,
            tokenizer_dir=p["hf_model"] or None,
            vit_model=p["vit_model"] or None,
            provider=p["provider"] or None,
            resident_kv=p["resident_kv"],
        )
        self.cameras = Cameras(topics)
        self._subscriber = CameraSubscriber(self, self.cameras, p["camera_qos"], self._on_image)
        notes = []
        if (
            self.engine.backend == "onnxruntime"
        ):  # what a CPU quota or taskset left it: a slow node's first clue
            n = self.engine.threads
            notes.append(f"{n} CPU thread{'s' * (n != 1)} per session")
        if self.engine.llm.resident:
            notes.append("KV cache in the backend buffers")
        if self.engine.cpu_changes:  # x86 without VNNI: say how the int8 graphs run here
            notes.append(
                "for this CPU's int8 GEMM: "
                + "; ".join(
                    f"{name}: {', '.join(changes)}"
                    for name, changes in self.engine.cpu_changes.items()
                )
            )
        how = f" ({', '.join(notes)})" if notes else ""
        self.get_logger().info(
            f"model {p['model_dir']} loaded on {self.engine.backend}{how}; "
            f"cameras: {', '.join(topics) or 'none'}"
        )

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._subscriber.start()
        self._camera_check = self.create_timer(1.0, self._check_cameras, clock=self._steady)
        with self._cv:
            self._active, self._state = True, "active"
        self.get_logger().info("active: answering questions")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._stop_serving("the node was deactivated")
        self._state = "inactive"
        self.get_logger().info(
            "inactive: questions are answered with an error until it is activated again"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self.engine, self._subscriber, self.cameras = None, None, Cameras([])
        self._state = "unconfigured"
        self.get_logger().info("model unloaded")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._stop_serving("the node is shutting down")
        self.engine, self._state = None, "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        self._stop_serving("the node failed")
        return TransitionCallbackReturn.SUCCESS

    def _stop_serving(self, reason: str) -> None:
        """Inactive from now: the running answer is cancelled, waiting ones answered, cameras
        dropped."""
        with self._cv:
            was_active, self._active = self._active, False
            waiting = list(self._jobs)
            self._jobs.clear()
            if self._current is not None:
                self._current.cancel_reason = reason
                self._current.cancel.set()
            while self._current is not None:  # the worker finishes it between two tokens
                self._cv.wait(0.1)
        for job in waiting:
            self._answer_error(job, CancelledError(f"cancelled: {reason}"))
        if was_active and self._subscriber is not None:
            self._subscriber.stop()
        if self._camera_check is not None:
            self.destroy_timer(self._camera_check)
            self._camera_check = None

    # --- callbacks: store or enqueue, nothing else -----------------------------------------------
    def _on_image(self, index: int, msg) -> None:
        stamp = Time.from_msg(msg.header.stamp).nanoseconds * 1e-9 or self._now()
        self.cameras.add(
            index,
            Frame(self.cameras.cameras[index].topic, stamp, msg),
            self.get_parameter("video.window_s").value,
            self.get_parameter("video.max_buffered_frames").value,
        )

    def _on_question(self, msg: String) -> None:
        self._submit(self._new_job(msg.data))

    def _new_job(self, question: str, **goal) -> Job:
        with self._cv:
            job = Job(self._next_id, question, time.monotonic(), **goal)
            self._next_id += 1
        return job

    def _submit(self, job: Job) -> None:
        """Queue ``job`` under the on_busy policy, or answer it with why not."""
        policy = self.get_parameter("on_busy").value
        limit = self.get_parameter("queue_size").value
        preempted: list[Job] = []
        with self._cv:
            busy = self._current is not None or bool(self._jobs)
            if not self._active:
                refusal = InactiveError(
                    f"the node is not active (lifecycle state {self._state}): nothing is "
                    "answered until it is activated"
                )
            elif policy == "drop" and busy:
                refusal = BusyError("busy: question dropped (on_busy=drop)")
            elif policy == "queue" and len(self._jobs) >= limit:
                refusal = BusyError(f"queue full ({limit} waiting): question dropped")
            else:
                refusal = None
                if policy == "preempt":
                    preempted = list(self._jobs)
                    self._jobs.clear()
                    if self._current is not None:
                        self._current.cancel_reason = "preempted by a newer question"
                        self._current.cancel.set()
                self._jobs.append(job)
                self._cv.notify()
        for old in preempted:
            self._answer_error(old, CancelledError("cancelled: preempted by a newer question"))
        if refusal is not None:
            self._answer_error(job, refusal)

    # --- the Ask action -------------------------------------------------------------------------
    async def _execute_goal(self, goal_handle):
        goal = goal_handle.request
        job = self._new_job(
            goal.question,
            mode=goal.mode,
            choices=tuple(goal.choices),
            max_new_tokens=goal.max_new_tokens,
            goal=goal_handle,
        )
        try:
            if goal.mode and goal.mode not in params.MODES:
                raise InvalidRequestError(
                    f"mode {goal.mode!r} is not one of {', '.join(params.MODES)}"
                )
            if goal.max_new_tokens > params.MAX_NEW_TOKENS:
                raise InvalidRequestError(
                    f"max_new_tokens {goal.max_new_tokens} is above {params.MAX_NEW_TOKENS}, "
                    "the most the max_new_tokens parameter takes"
                )
            job.cameras = tuple(self._resolve_camera(c) for c in goal.cameras)
        except InternVLError as e:
            self._answer_error(job, e)
        else:
            self._submit(job)
        answer = await job.result
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif answer.error_code == AnswerMsg.NONE:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return Ask.Result(success=answer.error_code == AnswerMsg.NONE, answer=answer)

    def _resolve_camera(self, name: str) -> str:
        try:
            return self.resolve_topic_name(name)
        except Exception as e:  # rclpy raises its name validation errors and RCLError
            raise UnknownCameraError(f"{name!r} is not a valid topic name ({e})") from e

    def _cancel_goal(self, goal_handle) -> CancelResponse:
        with self._cv:
            job = next(
                (
                    j
                    for j in (self._current, *self._jobs)
                    if j is not None and j.goal is goal_handle
                ),
                None,
            )
            if job is None:
                return CancelResponse.REJECT  # already answered
            if job is self._current:
                job.cancel_reason = "cancelled by its client"
                job.cancel.set()
                return CancelResponse.ACCEPT
            self._jobs.remove(job)
        self._answer_error(job, CancelledError("cancelled by its client"))
        return CancelResponse.ACCEPT

    # --- the worker -----------------------------------------------------------------------------
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
            except InternVLError as e:
                self._answer_error(job, e)
            except Exception as e:  # a backend or unforeseen failure must not stop the node
                self._answer_error(job, InternVLError(f"internal error: {type(e).__name__}: {e}"))
            finally:
                with self._cv:
                    self._current = None
                    self._cv.notify_all()

    def _serve(self, job: Job) -> None:
        s = params.Settings.read(self).for_goal(job.mode, job.max_new_tokens)
        info = job.info
        info.update(mode=s.mode, queue_wait_ms=f"{(time.monotonic() - job.received) * 1e3:.1f}")
        if not job.question.strip():
            raise InvalidRequestError("the question is empty")
        only = self.cameras.named(list(job.cameras)) if job.cameras else None
        now = self._now()
        frames, skipped = self._frames(s, now, only) if s.mode != "text" else ([], [])
        info["frames"] = "; ".join(
            f"{f.topic}@{f.stamp:.3f} (age {now - f.stamp:.2f} s)" for f, _ in frames
        )
        if skipped:
            info["cameras_skipped"] = "; ".join(skipped)
        images = [rgb for _, rgb in frames]
        request = Request(
            job.question,
            images=images if s.mode == "image" else (),
            video_frames=images if s.mode == "video" else (),
            max_tiles=s.max_tiles,
            system_prompt=s.system_prompt,
            choices=job.choices,
        )
        for item in self.engine.stream(request, s.generation, job.cancel):
            if isinstance(item, str):
                self._publish_chunk(job, item)
            else:
                answer = item
        used = [frames[i][0] for i in answer.frames_used]
        if answer.finish_reason == "cancelled":
            self._answer(
                job, answer, used, CancelledError(f"cancelled: {job.cancel_reason or 'stopped'}")
            )
            return
        warnings = skipped[:]
        if answer.timings.frames_dropped:
            info["frames_dropped"] = str(answer.timings.frames_dropped)
            warnings.append(
                f"answered from {len(used)} of {len(frames)} frames: more do not fit the model "
                "build's "
                "prompt limit (lower video.num_frames, or build for longer prompts)"
            )
        self._answer(job, answer, used, warnings=warnings)

    def _frames(
        self, s: params.Settings, now: float, only: list[int] | None
    ) -> tuple[list, list[str]]:
        """(frame, RGB image) pairs for the question, and the cameras skipped with why. Image mode:
        the latest frame of each fresh camera; video mode: the clip of the first fresh camera whose
        window holds at least 2 frames. A camera whose frame cannot be converted is skipped like a
        stale one."""
        views, reasons = self.cameras.fresh(now, s.max_frame_age_s, s.max_frame_lead_s, only)
        skipped = []
        chosen = []
        for view in views:
            picked = self._pick(view, s) if s.mode == "video" else [view.latest]
            if isinstance(picked, str):
                skipped.append(picked)
                continue
            try:
                converted = [(f, to_rgb(f.msg)) for f in picked]
            except ImageConversionError as e:
                skipped.append(f"{view.topic}: {e}")
                continue
            chosen += converted
            if s.mode == "video" or len(chosen) >= s.max_images:
                break
        if not chosen:
            raise NoFreshFrameError("no fresh camera frame: " + "; ".join(reasons + skipped))
        return chosen, skipped

    @staticmethod
    def _pick(view: CameraView, s: params.Settings) -> list[Frame] | str:
        """Video mode: ``num_frames`` frames spread over the camera's window (segment centres), in
        time order; or why the window is no video."""
        window = view.window
        if len(window) < 2:
            return (
                f"{view.topic}: video mode needs at least 2 frames; its window holds {len(window)} "
                "(a camera "
                "that just started, or sends too rarely for video.window_s)"
            )
        if len(window) <= s.num_frames:
            return list(window)
        return [window[i] for i in segment_centre_indices(len(window), s.num_frames)]

    # --- answering: every question ends here exactly once ---------------------------------------
    def _send(self, send, *args) -> bool:
        """``send(*args)``: a publish, a goal's feedback, a wake-up. False, and nothing sent, once
        ROS has shut down under the node: Ctrl-C reaches rclpy's signal handler, which invalidates
        every publisher at once, before the node's close() has stopped the worker."""
        try:
            send(*args)
        except Exception:
            if self.context.ok():
                raise
            return False
        return True

    def _publish_chunk(self, job: Job, text: str) -> None:
        self._send(self._stream_pub.publish, String(data=text))
        self._send(
            self._chunk_pub.publish, AnswerChunk(request_id=job.id, index=job.chunks, text=text)
        )
        job.chunks += 1
        if job.goal is not None:
            self._send(job.goal.publish_feedback, Ask.Feedback(request_id=job.id, text=text))

    def _answer_error(self, job: Job, error: Exception) -> None:
        self._answer(job, None, [], error)

    def _answer(
        self,
        job: Job,
        answer,
        frames: list[Frame],
        error: Exception | None = None,
        warnings: list[str] = (),
    ) -> None:
        """Publish one question's answer everywhere it goes, and complete its goal."""
        info = job.info
        code = error_code(error) if error is not None else AnswerMsg.NONE
        cancelled = isinstance(error, CancelledError)
        msg = AnswerMsg(
            request_id=job.id,
            question=job.question,
            mode=info.get("mode", ""),
            choice_index=-1,
            error_code=code,
            error_msg=str(error) if error is not None else "",
            finish_reason="cancelled"
            if cancelled
            else "error"
            if error is not None
            else answer.finish_reason,
            frames=[
                UsedFrame(topic=f.topic, stamp=Time(nanoseconds=int(f.stamp * 1e9)).to_msg())
                for f in frames
            ],
        )
        if answer is not None:
            t = answer.timings
            msg.text = answer.text if error is None or cancelled else ""
            msg.choice_index, msg.choice_probabilities = (
                answer.choice_index,
                answer.choice_probabilities,
            )
            msg.timings = TimingsMsg(
                vit_ms=t.vit_ms,
                prefill_tokens=t.prefill_tokens,
                reused_tokens=t.reused_tokens,
                ttft_ms=t.ttft_ms,
                generated_tokens=len(answer.token_ids),
                decode_ms_per_token=t.decode_ms_per_token,
                decode_tokens_per_s=t.decode_tokens_per_s,
                decode_bytes_per_token=t.decode_bytes_per_token,
                queue_wait_ms=float(info.get("queue_wait_ms", 0)),
                frames_dropped=t.frames_dropped,
            )
            if answer.choice_index >= 0:
                info["choice_probabilities"] = ", ".join(
                    f"{c}: {p:.3f}" for c, p in zip(job.choices, answer.choice_probabilities)
                )
            info.update(
                vit_ms=", ".join(f"{ms:.1f}" for ms in t.vit_ms),
                prefill_tokens=str(t.prefill_tokens),
                reused_tokens=str(t.reused_tokens),
                ttft_ms=f"{t.ttft_ms:.1f}",
                decode_tokens_per_s=f"{t.decode_tokens_per_s:.2f}",
                decode_ms_per_token=f"{t.decode_ms_per_token:.2f}",
                decode_bytes_per_token=f"{t.decode_bytes_per_token:.0f}",
                generated_tokens=str(len(answer.token_ids)),
                finish_reason=msg.finish_reason,
            )
        published = self._send(
            self._answer_pub.publish,
            String(data=msg.text if error is None else ERROR_PREFIX + msg.error_msg),
        )
        self._send(self._result_pub.publish, msg)
        self._send(
            self._chunk_pub.publish,
            AnswerChunk(
                request_id=job.id, index=job.chunks, final=True, finish_reason=msg.finish_reason
            ),
        )
        if error is not None:
            level, message = (WARN if cancelled else ERROR), str(error)
        elif warnings:
            level, message = WARN, "answered; " + "; ".join(warnings)
        else:
            level, message = OK, "answered"
        line = f"request {job.id} ({job.question[:60]!r}): {message}"
        if (
            not published
        ):  # the log is all that is left to tell, and an answer nobody got is no success
            line += " (not published: ROS has shut down)"
            level = ERROR if level == ERROR else WARN
        if level == ERROR:  # rclpy ties a severity to each logging call site, so one call each
            self.get_logger().error(line)
        elif level == WARN:
            self.get_logger().warning(line)
        else:  # one line per answer: the launch output shows what was asked, and how fast
            t = answer.timings
            speed = (
                f", {t.decode_tokens_per_s:.1f} tokens/s" if t.decode_tokens_per_s else ""
            )  # 0: no decode step
            n = len(answer.token_ids)
            self.get_logger().info(
                f"{line} ({n} token{'s' * (n != 1)}, {t.ttft_ms:.0f} ms to the first{speed})"
            )
        self._diagnose(job, level, message, info)
        job.result.set_result(msg)
        self._send(self._wake.trigger)

    def _diagnose(self, job: Job, level, message: str, info: dict) -> None:
        values = {
            "request_id": str(job.id),
            "question": job.question,
            "source": "goal" if job.goal else "topic",
            "backend": self.engine.backend if self.engine else "",
            **info,
        }
        self._publish_status(level, "answer", message, values)

    def _heartbeat(self) -> None:
        now, counts = time.monotonic(), self.cameras.counts()
        then, before = self._last_beat
        self._last_beat = (now, counts)
        with self._cv:
            queued, busy, active = len(self._jobs), self._current is not None, self._active
        values = {
            "state": self._state,
            "model_loaded": str(self.engine is not None).lower(),
            "backend": self.engine.backend if self.engine else "",
            "queue_length": str(queued),
            "busy": str(busy).lower(),
            "mode": self.get_parameter("mode").value,
        }
        problems = []
        for camera in self.cameras.cameras:
            values[f"frames_received {camera.topic}"] = str(counts[camera.topic])
            rate = (counts[camera.topic] - before.get(camera.topic, 0)) / max(now - then, 1e-9)
            values[f"rate_hz {camera.topic}"] = f"{rate:.2f}"
            values[f"qos {camera.topic}"] = camera.reliability.replace("_", " ") or "not subscribed"
            if problem := camera.type_problem():
                problems.append(problem)
        me = (self.get_name(), self.get_namespace())
        twins = self.get_node_names_and_namespaces().count(me) - 1  # launched twice, say
        self._graph_problem(
            problems,
            "twins",
            twins,
            f"{twins} other node(s) also named "
            f"{self.get_fully_qualified_name()}: they share its topics and its ask action, and a "
            "question is answered by each; give each a namespace or a name of its own",
        )
        # A reliable subscription does not match a best-effort publisher: its questions would vanish
        # unseen.
        topic = self._questions.topic_name
        unheard = sorted(
            f"{p.node_namespace.rstrip('/')}/{p.node_name}"
            for p in self.get_publishers_info_by_topic(topic)
            if p.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
        )
        self._graph_problem(
            problems,
            "unheard",
            unheard,
            f"best-effort publisher(s) on {topic} "
            f"({', '.join(unheard)}): their questions never reach this node, whose question "
            "subscription is reliable so that none is lost; publish questions reliable",
        )
        if self._now() == 0:
            problems.append(
                f"{CLOCK_AT_ZERO} (play a bag with --clock), so every camera frame looks stamped "
                "in the "
                "future"
            )
        level = WARN if problems or not active else OK
        message = "; ".join(problems) or ("busy" if busy else "idle" if active else values["state"])
        self._publish_status(level, "heartbeat", message, values)

    def _graph_problem(self, problems: list[str], kind: str, seen, message: str) -> None:
        """A problem the ROS graph shows (``seen``: what shows it; empty or 0 when nothing does): in
        the heartbeat while it lasts, logged once each time what shows it changes, not at every
        beat."""
        if seen:
            problems.append(message)
            if seen != self._graph_seen.get(kind):
                self.get_logger().warning(message)
        self._graph_seen[kind] = seen

    def _check_cameras(self) -> None:
        for change in self._subscriber.check():
            self.get_logger().warning(
                change
            ) if "publishers of" in change else self.get_logger().info(change)

    def _publish_status(self, level, kind: str, message: str, values: dict) -> None:
        status = DiagnosticStatus(
            level=level,
            name=f"{self.get_name()}: {kind}",
            message=message,
            hardware_id=self.get_fully_qualified_name(),
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        self._send(
            self._diag_pub.publish,
            DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]),
        )

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_set_parameters(self, changes):
        result = params.validate(changes)
        if result.successful:
            for p in changes:
                if p.name == "heartbeat_period_s":  # takes effect now, not at the next beat
                    self._heartbeat_timer.timer_period_ns = int(float(p.value) * 1e9)
                    self._heartbeat_timer.reset()
        return result

    def close(self) -> None:
        """Stop serving and the worker (after shutdown, or when the node could not start)."""
        self._stop_serving("the node is shutting down")
        with self._cv:
            self._running = False
            self._cv.notify_all()
        self._worker.join(timeout=10)


def usage() -> str:
    lines = [
        "usage: internvl_node --ros-args [--params-file FILE] [-p NAME:=VALUE ...] [-r FROM:=TO "
        "...]",
        "",
        "The internvl node: answers questions (the question topic, the ask action) about what the "
        "cameras",
        "see. Every parameter, with its default (* needs a restart):",
        "",
    ]
    for name, p in params.PARAMETERS.items():
        lines.append(f"  {name}{' *' if p.read_only else ''} = {p.default!r}")
        lines.append(
            f"      {p.description}" + (f" One of: {', '.join(p.choices)}." if p.choices else "")
        )
    lines += [
        "",
        "Example:",
        "  internvl_node --ros-args --params-file config/internvl.yaml -p model_dir:=model",
        "  (or: ros2 launch internvl_ros internvl.launch.py model_dir:=model)",
    ]
    return "\n".join(lines)


def main(args=None) -> int:
    argv = sys.argv[1:] if args is None else list(args)
    own = argv[: argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own or "--help" in own:
        print(usage())
        return 0
    logger = rclpy.logging.get_logger("internvl")
    try:
        rclpy.init(args=args)
    except (
        RuntimeError
    ) as e:  # rcl refused the ROS arguments: a -p rule, a parameter file, an unknown option
        reason = re.sub(r", at \S+:\d+", "", str(e))  # rcl's source locations say nothing to a user
        logger.fatal(
            f"cannot start: rclpy.init refused the command line: {type(e).__name__}: {reason}"
        )
        return 1
    try:
        node = InternVLNode(command_line=argv)
    except InternVLError as e:
        logger.fatal(f"cannot start: {e}")
        rclpy.try_shutdown()
        return 1
    code = 0
    try:
        if node.get_parameter("autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal(
                    f"cannot start: {getattr(node, 'configure_error', 'configure failed')}"
                )
                code = 1
            elif node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("cannot start: activate failed")
                code = 1
        if code == 0:
            rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # ros2 launch without a TTY forwards a SIGINT the process group already got: a second one
        # must not cut the clean-up short with a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
