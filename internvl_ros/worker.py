"""The node's one worker thread: it owns the answerer and answers the queue's jobs in turn, each
from the camera frames its mode asks for."""

from __future__ import annotations

import threading
import time

from internvl_engine.answering import Chunk, Request, checked_question
from internvl_engine.errors import InternVLError
from internvl_engine.preprocess import segment_centre_indices

from . import params
from .cameras import CameraView, Frame, NoFreshFrameError
from .image_msgs import ImageConversionError, to_rgb
from .jobs import CancelledError, Job, JobQueue
from .outputs import Outputs


class Worker:
    def __init__(self, node, jobs: JobQueue, outputs: Outputs):
        self.node, self.jobs, self.outputs = node, jobs, outputs
        self.answerer = None  # set at configure, dropped at cleanup
        self._thread = threading.Thread(target=self._work, name="internvl-worker", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def _work(self) -> None:
        while (job := self.jobs.take()) is not None:
            try:
                self._serve(job)
            except InternVLError as e:
                self.outputs.error(job, e)
            except Exception as e:  # a backend or unforeseen failure must not stop the node
                self.outputs.error(job, InternVLError(f"internal error: {type(e).__name__}: {e}"))
            finally:
                self.jobs.finish()

    def _serve(self, job: Job) -> None:
        s = params.Settings.read(self.node).for_goal(job.mode, job.max_new_tokens)
        info = job.info
        info.update(mode=s.mode, queue_wait_ms=f"{(time.monotonic() - job.received) * 1e3:.1f}")
        # an empty question, a bad phrase to ground: refused before the cameras are looked at
        checked_question(Request(job.question, ground=job.ground, choices=job.choices))
        cameras = self.node.cameras
        only = cameras.named(list(job.cameras)) if job.cameras else None
        now = self.node.now()
        frames, skipped = self._frames(cameras, s, now, only) if s.mode != "text" else ([], [])
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
            ground=job.ground,
        )
        for item in self.answerer.stream(request, s.generation, job.cancel):
            if isinstance(item, Chunk):
                self.outputs.chunk(job, item.text)
            else:
                answer = item
        used = [frames[i][0] for i in answer.frames_used]
        sizes = [frames[i][1].shape[1::-1] for i in answer.frames_used]
        if answer.finish_reason == "cancelled":
            self.outputs.answer(
                job,
                answer,
                used,
                CancelledError(f"cancelled: {job.cancel_reason or 'stopped'}"),
                sizes=sizes,
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
        if answer.box_problems:
            info["box_problems"] = "; ".join(map(str, answer.box_problems))
            warnings.append(
                f"{len(answer.box_problems)} box{'es' * (len(answer.box_problems) > 1)} in the "
                "answer name no place: " + "; ".join(map(str, answer.box_problems))
            )
        self.outputs.answer(job, answer, used, warnings=warnings, sizes=sizes)

    def _frames(
        self, cameras, s: params.Settings, now: float, only: list[int] | None
    ) -> tuple[list, list[str]]:
        """(frame, RGB image) pairs for the question, and the cameras skipped with why. Image mode:
        the latest frame of each fresh camera; video mode: the clip of the first fresh camera whose
        window holds at least 2 frames. A camera whose frame cannot be converted is skipped like a
        stale one."""
        views, reasons = cameras.fresh(now, s.max_frame_age_s, s.max_frame_lead_s, only)
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
