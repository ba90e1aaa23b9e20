"""The node's cameras: their subscriptions, and per-camera frame buffers.

Messages are kept as they arrive and converted only when a question uses them, so an idle node with
a 30 Hz 1080p camera does no image work. Callbacks add frames; the worker takes snapshots.

Subscriptions follow ``camera_qos``: ``auto`` takes the reliability the camera's publishers offer
(reliable when every publisher is: a reliable link resends lost fragments of large frames; best
effort otherwise, since a reliable subscription does not connect to a best-effort publisher),
re-checked as publishers come and go, as ``ros2 topic echo`` does. A publisher of another message
type on a camera topic (a CompressedImage camera on a raw topic, say) is noticed and named.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from functools import partial

from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

from internvl_engine import InternVLError

IMAGE_TYPES = {Image: "sensor_msgs/msg/Image", CompressedImage: "sensor_msgs/msg/CompressedImage"}
RELIABLE_CAMERA = QoSProfile(depth=30, reliability=ReliabilityPolicy.RELIABLE)
CLOCK_AT_ZERO = (
    "this node's clock reads 0: use_sim_time is true and nothing has been published on /clock"
)
# A stamp below this (2001-09-09) beside a clock above it is no wall time: a camera's time since
# boot.
SINCE_BOOT_BELOW = 1e9


class NoFreshFrameError(InternVLError):
    """No camera has a usable frame recent enough; the message says why for each camera."""


class UnknownCameraError(InternVLError):
    """A question names a camera that is not one of the node's image_topics."""


@dataclass(frozen=True)
class Frame:
    topic: str
    stamp: float  # seconds: header stamp, or receive time when the stamp is zero
    msg: object


@dataclass
class Camera:
    topic: str  # fully qualified
    msg_type: type  # Image or CompressedImage, by the topic's name
    latest: Frame | None = None
    # time-ordered, thinned to max_frames over window_s
    history: deque = field(default_factory=deque)
    received: int = 0
    reliability: str = ""  # of the current subscription: "reliable" | "best_effort"
    other_types: tuple[str, ...] = ()  # message types of publishers this topic cannot take

    @property
    def type_name(self) -> str:
        return IMAGE_TYPES[self.msg_type]

    def add(self, frame: Frame, window_s: float, max_frames: int) -> None:
        self.latest = frame
        self.received += 1
        if self.history and frame.stamp < self.history[-1].stamp:
            self.history.clear()  # time went backwards (a bag looped, sim time reset)
        if not self.history or frame.stamp - self.history[-1].stamp >= window_s / max_frames:
            self.history.append(frame)
        while self.history and (
            len(self.history) > max_frames or self.history[0].stamp < frame.stamp - window_s
        ):
            self.history.popleft()

    def type_problem(self) -> str | None:
        if not self.other_types:
            return None
        return (
            f"{self.topic} has publishers of {', '.join(self.other_types)}, but the node takes "
            f"{self.type_name} "
            "there (a topic ending in /compressed takes sensor_msgs/msg/CompressedImage, any "
            "other "
            f"sensor_msgs/msg/Image)"
        )

    def unusable(self, now: float, max_age_s: float, max_lead_s: float) -> str | None:
        """Why this camera's latest frame cannot be used, or None when it is fresh."""
        if self.latest is None:
            return f"{self.topic}: no frame received" + (
                f" ({problem})" if (problem := self.type_problem()) else ""
            )
        age = now - self.latest.stamp
        if age > max_age_s:
            why = ""
            if self.latest.stamp < SINCE_BOOT_BELOW <= now:
                why = (
                    f": stamped {self.latest.stamp:.0f} s after 1970, like a clock since boot "
                    "(V4L2's), not ROS "
                    "time: stamp frames with ROS time"
                )
            return f"{self.topic}: last frame {age:.2f} s old (max_frame_age_s {max_age_s:g}){why}"
        if -age > max_lead_s:
            why = (
                CLOCK_AT_ZERO
                if now == 0
                else "is the camera's clock ahead? Synchronise the machines' clocks"
            )
            return (
                f"{self.topic}: last frame stamped {-age:.2f} s ahead of this node's clock "
                "(max_frame_lead_s "
                f"{max_lead_s:g}): {why}"
            )
        return None


@dataclass(frozen=True)
class CameraView:
    """A camera as a question sees it: its latest frame and its window, taken under the lock."""

    topic: str
    latest: Frame
    window: tuple[Frame, ...]


class Cameras:
    """All cameras of the node; callbacks add, the worker selects. One lock guards both."""

    def __init__(self, topics: list[str]):
        self.cameras = [
            Camera(t, CompressedImage if t.endswith("/compressed") else Image) for t in topics
        ]
        self._lock = threading.Lock()

    def add(self, index: int, frame: Frame, window_s: float, max_frames: int) -> None:
        with self._lock:
            self.cameras[index].add(frame, window_s, max_frames)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {c.topic: c.received for c in self.cameras}

    def named(self, names: list[str]) -> list[int]:
        """Indices of the cameras named (resolved topics); every name must be one of them."""
        topics = [c.topic for c in self.cameras]
        if unknown := [n for n in names if n not in topics]:
            raise UnknownCameraError(
                f"unknown camera {', '.join(unknown)} (the node's cameras: {', '.join(topics)})"
            )
        return [topics.index(n) for n in names]

    def fresh(
        self, now: float, max_age_s: float, max_lead_s: float, only: list[int] | None = None
    ) -> tuple[list[CameraView], list[str]]:
        """The cameras (in image_topics order, or only those given) whose latest frame is fresh, and
        why each other one is not."""
        views, reasons = [], []
        with self._lock:
            for i, camera in enumerate(self.cameras):
                if only is not None and i not in only:
                    continue
                if why := camera.unusable(now, max_age_s, max_lead_s):
                    reasons.append(why)
                else:
                    views.append(CameraView(camera.topic, camera.latest, tuple(camera.history)))
        return views, reasons


class CameraSubscriber:
    """The node's camera subscriptions, made while it is active. ``qos``: auto, sensor_data or
    reliable."""

    def __init__(self, node, cameras: Cameras, qos: str, on_frame):
        self.node, self.cameras, self.qos, self.on_frame = node, cameras, qos, on_frame
        self._subscriptions: dict[int, object] = {}

    def start(self) -> None:
        for index, camera in enumerate(self.cameras.cameras):
            self._subscribe(index, "reliable" if self.qos == "reliable" else "best_effort")
        if self.qos == "auto":
            self.check()

    def stop(self) -> None:
        for subscription in self._subscriptions.values():
            self.node.destroy_subscription(subscription)
        self._subscriptions.clear()

    def _subscribe(self, index: int, reliability: str) -> None:
        camera = self.cameras.cameras[index]
        if index in self._subscriptions:
            self.node.destroy_subscription(self._subscriptions.pop(index))
        profile = RELIABLE_CAMERA if reliability == "reliable" else qos_profile_sensor_data
        self._subscriptions[index] = self.node.create_subscription(
            camera.msg_type, camera.topic, partial(self.on_frame, index), profile
        )
        camera.reliability = reliability

    def check(self) -> list[str]:
        """Follow the publishers (auto), and note publishers of other message types. Returns what
        changed, one line each, for the log."""
        changes = []
        for index, camera in enumerate(self.cameras.cameras):
            publishers = [
                p
                for p in self.node.get_publishers_info_by_topic(camera.topic)
                if p.node_name != self.node.get_name()
                or p.node_namespace != self.node.get_namespace()
            ]
            others = tuple(
                sorted({p.topic_type for p in publishers if p.topic_type != camera.type_name})
            )
            if others != camera.other_types:
                camera.other_types = others
                if problem := camera.type_problem():
                    changes.append(problem)
            if self.qos != "auto" or not self._subscriptions:
                continue
            mine = [p for p in publishers if p.topic_type == camera.type_name]
            if not mine:
                continue  # keep the subscription until publishers say otherwise
            wanted = (
                "reliable"
                if all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in mine)
                else "best_effort"
            )
            if wanted != camera.reliability:
                self._subscribe(index, wanted)
                changes.append(
                    f"{camera.topic}: subscribed {wanted.replace('_', ' ')}, as its "
                    f"{len(mine)} publisher(s) offer"
                )
        return changes
