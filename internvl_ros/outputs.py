"""Everything the node publishes about an answer, in one place: a new output joins here.

Every question gets exactly one answer, whatever happens to it: the text on ``answer`` (or one line
starting ``ERROR: ``), an internvl_msgs/Answer on ``answer/result``, a final AnswerChunk, a status
on /diagnostics, one log line and, for a goal, its result; the boxes of a grounded answer also go
to ``detections`` (see detections.py). Chunks stream on ``answer/stream``
(text), ``answer/chunks`` (with the request id) and as the goal's feedback.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header, String

from internvl_engine.errors import (
    BackendError,
    ImageError,
    InvalidRequestError,
    ModelDirError,
    PromptTooLongError,
    ServerError,
    ServerUnreachableError,
    VideoError,
)

from .cameras import Frame, NoFreshFrameError, UnknownCameraError
from .detections import Detections, frame_header
from .interface import ANSWER_QOS, ERROR_PREFIX
from .jobs import BusyError, CancelledError, InactiveError, Job

try:
    from internvl_msgs.action import Ask
    from internvl_msgs.msg import Answer as AnswerMsg
    from internvl_msgs.msg import AnswerChunk, UsedFrame
    from internvl_msgs.msg import Box as BoxMsg
    from internvl_msgs.msg import Timings as TimingsMsg
except ImportError as e:
    raise ImportError(
        f"{e}: the node needs the internvl_msgs interface package: build the workspace (make ws, "
        "or "
        "colcon build in ros2_ws) and source its install/setup.bash"
    ) from e

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
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
    (ServerUnreachableError, AnswerMsg.SERVER_UNREACHABLE),
    (ServerError, AnswerMsg.SERVER_ERROR),
]  # a model that does not fit its manifest cannot run


def error_code(error: Exception) -> int:
    return next((code for kind, code in ERROR_CODES if isinstance(error, kind)), AnswerMsg.UNKNOWN)


def timings_msg(answer, queue_wait_ms: float) -> TimingsMsg:
    t = answer.timings
    return TimingsMsg(
        vit_ms=t.vit_ms,
        prefill_tokens=t.prefill_tokens,
        reused_tokens=t.reused_tokens,
        ttft_ms=t.ttft_ms,
        generated_tokens=len(answer.token_ids),
        decode_ms_per_token=t.decode_ms_per_token,
        decode_tokens_per_s=t.decode_tokens_per_s,
        decode_bytes_per_token=t.decode_bytes_per_token,
        queue_wait_ms=queue_wait_ms,
        frames_dropped=t.frames_dropped,
    )


class Outputs:
    """The answer topics, /diagnostics and the goals' results of ``node``. Always there, so a
    question or goal in any lifecycle state gets an answer, never silence."""

    def __init__(self, node):
        self.node = node
        self.backend = ""  # what answers, for /diagnostics (the answerer's backend once configured)
        self._answer = node.create_publisher(String, "answer", ANSWER_QOS)
        self._stream = node.create_publisher(String, "answer/stream", ANSWER_QOS)
        self._result = node.create_publisher(AnswerMsg, "answer/result", ANSWER_QOS)
        self._chunks = node.create_publisher(AnswerChunk, "answer/chunks", ANSWER_QOS)
        self._diagnostics = node.create_publisher(DiagnosticArray, "/diagnostics", ANSWER_QOS)
        self.detections = Detections(node)
        # resumes goals waiting for their answer
        self.wake = node.create_guard_condition(lambda: None)

    def send(self, send, *args) -> bool:
        """``send(*args)``: a publish, a goal's feedback, a wake-up. False, and nothing sent, once
        ROS has shut down under the node: Ctrl-C reaches rclpy's signal handler, which invalidates
        every publisher at once, before the node's close() has stopped the worker."""
        try:
            send(*args)
        except Exception:
            if self.node.context.ok():
                raise
            return False
        return True

    def chunk(self, job: Job, text: str) -> None:
        self.send(self._stream.publish, String(data=text))
        self.send(self._chunks.publish, AnswerChunk(request_id=job.id, index=job.chunks, text=text))
        job.chunks += 1
        if job.goal is not None:
            self.send(job.goal.publish_feedback, Ask.Feedback(request_id=job.id, text=text))

    def error(self, job: Job, error: Exception) -> None:
        self.answer(job, None, [], error)

    def answer(
        self,
        job: Job,
        answer,
        frames: list[Frame],
        error: Exception | None = None,
        warnings: list[str] = (),
        sizes: list[tuple[int, int]] = (),
    ) -> None:
        """Publish one question's answer everywhere it goes, and complete its goal. ``frames``: the
        camera frames in the prompt, in order; ``sizes``: their (width, height) in pixels."""
        info = job.info
        cancelled = isinstance(error, CancelledError)
        msg = AnswerMsg(
            request_id=job.id,
            question=job.question,
            ground=job.ground,
            mode=info.get("mode", ""),
            choice_index=-1,
            error_code=error_code(error) if error is not None else AnswerMsg.NONE,
            error_msg=str(error) if error is not None else "",
            finish_reason="cancelled"
            if cancelled
            else "error"
            if error is not None
            else answer.finish_reason,
            frames=[
                UsedFrame(
                    topic=f.topic,
                    # the header's own stamp, to the nanosecond (f.stamp, in float seconds, is not)
                    stamp=frame_header(f).stamp,
                    frame_id=frame_header(f).frame_id,
                    width=int(size[0]) if size else 0,
                    height=int(size[1]) if size else 0,
                )
                for f, size in itertools.zip_longest(frames, sizes[: len(frames)])
            ],
        )
        # the boxes' images as indices into msg.frames (the request's pictures were all the frames
        # the worker picked; the prompt may hold fewer)
        boxes = []
        if answer is not None and answer.boxes and (error is None or cancelled):
            boxes = [
                replace(b, image=answer.frames_used.index(b.image))
                for b in answer.boxes
                if b.image in answer.frames_used
            ]
            msg.boxes = [
                BoxMsg(
                    label=b.label,
                    frame=b.image,
                    x_min=b.x1,
                    y_min=b.y1,
                    x_max=b.x2,
                    y_max=b.y2,
                    normalized=[float(v) for v in b.normalized],
                )
                for b in boxes
            ]
        if answer is not None:
            msg.box_problems = [str(p) for p in answer.box_problems]
        if answer is not None:
            t = answer.timings
            msg.text = answer.text if error is None or cancelled else ""
            msg.choice_index, msg.choice_probabilities = (
                answer.choice_index,
                answer.choice_probabilities,
            )
            msg.timings = timings_msg(answer, float(info.get("queue_wait_ms", 0)))
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
        if error is None:
            self.detections.publish(
                self.send, replace(answer, boxes=boxes), frames, bool(job.ground)
            )
        published = self.send(
            self._answer.publish,
            String(data=msg.text if error is None else ERROR_PREFIX + msg.error_msg),
        )
        self.send(self._result.publish, msg)
        self.send(
            self._chunks.publish,
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
        self._log(job, answer, level, message, published)
        values = {
            "request_id": str(job.id),
            "question": job.question,
            "source": "goal" if job.goal else "topic",
            "backend": self.backend,
            **info,
        }
        self.status(level, "answer", message, values)
        if job.result is not None:
            job.result.set_result(msg)
        self.send(self.wake.trigger)

    def _log(self, job: Job, answer, level, message: str, published: bool) -> None:
        line = f"request {job.id} ({job.question[:60]!r}): {message}"
        # the log is all that is left to tell, and an answer nobody got is no success
        if not published:
            line += " (not published: ROS has shut down)"
            level = ERROR if level == ERROR else WARN
        logger = self.node.get_logger()
        if level == ERROR:  # rclpy ties a severity to each logging call site, so one call each
            logger.error(line)
        elif level == WARN:
            logger.warning(line)
        else:  # one line per answer: the launch output shows what was asked, and how fast
            t = answer.timings
            # 0: no decode step
            speed = f", {t.decode_tokens_per_s:.1f} tokens/s" if t.decode_tokens_per_s else ""
            n = len(answer.token_ids)
            logger.info(
                f"{line} ({n} token{'s' * (n != 1)}, {t.ttft_ms:.0f} ms to the first{speed})"
            )

    def status(self, level, kind: str, message: str, values: dict) -> None:
        status = DiagnosticStatus(
            level=level,
            name=f"{self.node.get_name()}: {kind}",
            message=message,
            hardware_id=self.node.get_fully_qualified_name(),
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        self.send(
            self._diagnostics.publish,
            DiagnosticArray(
                header=Header(stamp=self.node.get_clock().now().to_msg()), status=[status]
            ),
        )
