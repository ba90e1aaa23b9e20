"""Grounded answers as vision_msgs detections: one ``vision_msgs/Detection2DArray`` per camera frame
an answer's boxes are in, on the ``detections`` topic, with that frame's header (its stamp and
``frame_id``), so TF and an aligned depth image can be matched to it.

vision_msgs is not part of a minimal ROS install (``apt install ros-humble-vision-msgs``). Where it
is missing the node still serves: the boxes are in ``answer/result`` and the Ask result
(internvl_msgs/Box), and the start-up line says that this topic is off and why.
"""

from __future__ import annotations

from builtin_interfaces.msg import Time as TimeMsg
from rclpy.time import Time
from std_msgs.msg import Header

from .interface import ANSWER_QOS

try:
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

    MISSING = ""
except ImportError as e:  # the node serves without it
    MISSING = f"{e} (apt install ros-humble-vision-msgs, or build vision_msgs into the workspace)"

# InternVL writes a box without a confidence: each detection's one hypothesis has this score.
SCORE = 1.0


def frame_header(frame) -> Header:
    """The camera frame's own header: its stamp (the receive time where the camera left it zero, as
    the node's frame ages use) and frame_id."""
    header = getattr(frame.msg, "header", None)
    stamp = header.stamp if header is not None else TimeMsg()
    if stamp.sec == 0 and stamp.nanosec == 0:
        stamp = Time(nanoseconds=int(frame.stamp * 1e9)).to_msg()
    return Header(stamp=stamp, frame_id=header.frame_id if header is not None else "")


def detection_arrays(boxes, frames) -> list:
    """One Detection2DArray per frame of ``frames`` (the answer's, in prompt order), with the boxes
    (grounding.Box, whose ``image`` indexes ``frames``) that are in it."""
    arrays = []
    for index, frame in enumerate(frames):
        header = frame_header(frame)
        detections = []
        for box in (b for b in boxes if b.image == index):
            detection = Detection2D(header=header, id="")
            detection.bbox.center.position.x, detection.bbox.center.position.y = box.center
            detection.bbox.size_x, detection.bbox.size_y = box.size
            hypothesis = ObjectHypothesisWithPose()
            hypothesis.hypothesis.class_id, hypothesis.hypothesis.score = box.label, SCORE
            # the box's centre, in pixels (z 0): no 3D pose without depth
            hypothesis.pose.pose.position.x, hypothesis.pose.pose.position.y = box.center
            detection.results = [hypothesis]
            detections.append(detection)
        arrays.append(Detection2DArray(header=header, detections=detections))
    return arrays


class Detections:
    """The ``detections`` publisher of ``node``, or why there is none."""

    def __init__(self, node):
        self.missing = MISSING
        self._publisher = (
            None if MISSING else node.create_publisher(Detection2DArray, "detections", ANSWER_QOS)
        )

    def describe(self) -> str:
        return (
            "detections on vision_msgs/Detection2DArray"
            if self._publisher
            else f"detections topic off: no vision_msgs ({self.missing})"
        )

    def publish(self, send, answer, frames, grounding: bool) -> None:
        """The answer's boxes, one array per frame. A grounding question publishes an array for
        every frame it used, empty where nothing was found (a consumer hears "not there"); any other
        answer only for frames that hold a box."""
        if self._publisher is None:
            return
        for array in detection_arrays(answer.boxes, frames):
            if array.detections or grounding:
                send(self._publisher.publish, array)
