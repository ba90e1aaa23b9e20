"""What the node and its clients agree on besides the message types: the error prefix of the text
answer, and the QoS of the question and answer topics. Light: rclpy's QoS only, no node, no
engine."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

ERROR_PREFIX = "ERROR: "
# Questions keep every message until taken (a burst of 1000 reaches the node); answers, chunks and
# statuses keep up to this many unacknowledged ones per reader.
QUESTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)
ANSWER_DEPTH = 1000
ANSWER_QOS = QoSProfile(
    depth=ANSWER_DEPTH, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE
)
