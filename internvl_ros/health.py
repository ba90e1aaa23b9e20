"""The node's heartbeat on /diagnostics: its lifecycle state, the queue, each camera's frames, rate
and reliability, and what the ROS graph shows is wrong (a camera publisher of another type, a twin
node, a best-effort question publisher, a clock at 0), each logged once when it changes."""

from __future__ import annotations

import time

from rclpy.qos import ReliabilityPolicy

from .cameras import CLOCK_AT_ZERO
from .outputs import OK, WARN


class Heartbeat:
    def __init__(self, node):
        self.node = node
        self._last_beat = (time.monotonic(), {})
        self._graph_seen: dict[
            str, object
        ] = {}  # what the last heartbeat saw of each graph problem

    def beat(self) -> None:
        node, jobs = self.node, self.node.jobs
        now, counts = time.monotonic(), node.cameras.counts()
        then, before = self._last_beat
        self._last_beat = (now, counts)
        answerer = node.worker.answerer
        values = {
            "state": jobs.state,
            "model_loaded": str(answerer is not None).lower(),
            "backend": answerer.backend if answerer else "",
            "queue_length": str(len(jobs)),
            "busy": str(jobs.busy).lower(),
            "mode": node.get_parameter("mode").value,
        }
        problems = []
        for camera in node.cameras.cameras:
            values[f"frames_received {camera.topic}"] = str(counts[camera.topic])
            rate = (counts[camera.topic] - before.get(camera.topic, 0)) / max(now - then, 1e-9)
            values[f"rate_hz {camera.topic}"] = f"{rate:.2f}"
            values[f"qos {camera.topic}"] = camera.reliability.replace("_", " ") or "not subscribed"
            if problem := camera.type_problem():
                problems.append(problem)
        me = (node.get_name(), node.get_namespace())
        twins = node.get_node_names_and_namespaces().count(me) - 1  # launched twice, say
        self._graph_problem(
            problems,
            "twins",
            twins,
            f"{twins} other node(s) also named "
            f"{node.get_fully_qualified_name()}: they share its topics and its ask action, and a "
            "question is answered by each; give each a namespace or a name of its own",
        )
        # A reliable subscription does not match a best-effort publisher: its questions would vanish
        # unseen.
        topic = node.questions.topic_name
        unheard = sorted(
            f"{p.node_namespace.rstrip('/')}/{p.node_name}"
            for p in node.get_publishers_info_by_topic(topic)
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
        if node.now() == 0:
            problems.append(
                f"{CLOCK_AT_ZERO} (play a bag with --clock), so every camera frame looks stamped "
                "in the "
                "future"
            )
        level = WARN if problems or not jobs.active else OK
        message = "; ".join(problems) or (
            "busy" if jobs.busy else "idle" if jobs.active else values["state"]
        )
        node.outputs.status(level, "heartbeat", message, values)

    def _graph_problem(self, problems: list[str], kind: str, seen, message: str) -> None:
        """A problem the ROS graph shows (``seen``: what shows it; empty or 0 when nothing does): in
        the heartbeat while it lasts, logged once each time what shows it changes, not at every
        beat."""
        if seen:
            problems.append(message)
            if seen != self._graph_seen.get(kind):
                self.node.get_logger().warning(message)
        self._graph_seen[kind] = seen
