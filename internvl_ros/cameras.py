"""Per-camera frame buffers. Messages are kept as they arrive and converted only when a question
uses them, so an idle node with a 30 Hz 1080p camera does no image work."""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from internvl_engine.preprocess import segment_centre_indices


@dataclass(frozen=True)
class Frame:
    topic: str
    stamp: float  # seconds: header stamp, or receive time when the stamp is zero
    msg: object


class NoFreshFrameError(Exception):
    """No camera has a frame recent enough; the message says which are stale and by how much."""


class NotEnoughFramesError(Exception):
    """Video mode, but the camera's window holds fewer than 2 frames."""


class Camera:
    def __init__(self, topic: str):
        self.topic = topic
        self.latest: Frame | None = None
        self.history: deque[Frame] = deque()  # time-ordered, thinned to max_frames over window_s
        self.received = 0

    def add(self, frame: Frame, window_s: float, max_frames: int) -> None:
        self.latest = frame
        self.received += 1
        if self.history and frame.stamp < self.history[-1].stamp:
            self.history.clear()  # time went backwards (a bag looped, sim time reset)
        if not self.history or frame.stamp - self.history[-1].stamp >= window_s / max_frames:
            self.history.append(frame)
        while self.history and (len(self.history) > max_frames or self.history[0].stamp < frame.stamp - window_s):
            self.history.popleft()

    def staleness(self, now: float, max_age_s: float) -> str | None:
        """Why this camera's latest frame cannot be used, or None when it is fresh."""
        if self.latest is None:
            return f"{self.topic}: no frame received"
        age = now - self.latest.stamp
        return f"{self.topic}: last frame {age:.2f} s old (max_frame_age_s {max_age_s:g})" if age > max_age_s else None


class Cameras:
    """All cameras of the node; callbacks add, the worker selects. One lock guards both."""

    def __init__(self, topics: list[str]):
        self.cameras = [Camera(t) for t in topics]
        self._lock = threading.Lock()

    def add(self, index: int, frame: Frame, window_s: float, max_frames: int) -> None:
        with self._lock:
            self.cameras[index].add(frame, window_s, max_frames)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {c.topic: c.received for c in self.cameras}

    def latest_frames(self, now: float, max_age_s: float, max_images: int) -> list[Frame]:
        """Image mode: the latest fresh frame of each camera, in image_topics order."""
        with self._lock:
            stale = [c.staleness(now, max_age_s) for c in self.cameras]
            fresh = [c.latest for c, why in zip(self.cameras, stale) if why is None]
        if not fresh:
            raise NoFreshFrameError("no fresh camera frame: " + "; ".join(stale))
        return fresh[:max_images]

    def clip(self, now: float, max_age_s: float, num_frames: int) -> list[Frame]:
        """Video mode: ``num_frames`` frames sampled uniformly (segment centres), in time order, from
        the buffered window (the last ``video.window_s`` seconds of frames) of the first camera whose
        latest frame is fresh. A window of fewer than 2 frames is no video: that is an error."""
        with self._lock:
            stale = []
            for camera in self.cameras:
                if why := camera.staleness(now, max_age_s):
                    stale.append(why)
                    continue
                window = list(camera.history)
                if len(window) < 2:
                    raise NotEnoughFramesError(f"video mode needs at least 2 frames: the window of {camera.topic} "
                                               f"holds {len(window)} (a camera that just started, or sends too "
                                               "rarely for video.window_s)")
                if len(window) <= num_frames:
                    return window
                return [window[i] for i in segment_centre_indices(len(window), num_frames)]
        raise NoFreshFrameError("no fresh camera frame: " + "; ".join(stale))
