"""The internvl node: camera topics, the question topic and the Ask action in; answers out.

A managed (lifecycle) node, so nav2's lifecycle_manager can bring it up and down with a navigation
stack: configure loads the model, activate subscribes to the cameras and serves, deactivate stops
serving and drops the camera subscriptions, cleanup frees the model. With ``autostart`` (the
default) it configures and activates itself, as a plain node comes up.

A thin shell over its rooms: ``params`` (every parameter, declared and checked in one table),
``jobs`` (the queue and the ``on_busy`` policies, without ROS), ``worker`` (the one thread that
owns the answerer), ``outputs`` (everything published about an answer), ``action`` (Ask goals),
``health`` (the heartbeat) and ``cameras``. Callbacks only store frames or enqueue questions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.time import Time
from std_msgs.msg import String

from internvl_engine.errors import InternVLError

from . import params
from .action import AskServer
from .cameras import Cameras, CameraSubscriber, Frame
from .command_line import check_command_line
from .health import Heartbeat
from .interface import QUESTION_QOS
from .jobs import CancelledError, Job, JobQueue
from .outputs import Outputs
from .worker import Worker


def remote_answerer(p: dict):
    """A server answering for this node (server_url set)."""
    from internvl_engine.remote import RemoteAnswerer

    return RemoteAnswerer(
        p["server_url"],
        p["server_model"],
        os.environ.get(p["server_api_key_env"]) if p["server_api_key_env"] else None,
        p["server_timeout_s"],
        p["system_prompt"],
    )


def local_answerer(p: dict):
    """The model in this process, as the parameters say."""
    from internvl_engine.engine import Engine

    return Engine(
        p["model_dir"],
        backend=p["backend"],
        threads=p["threads"] or None,
        tokenizer_dir=p["hf_model"] or None,
        vit_model=p["vit_model"] or None,
        provider=p["provider"] or None,
        resident_kv=p["resident_kv"],
    )


class InternVLNode(LifecycleNode):
    def __init__(self, command_line: Sequence[str] = (), **kwargs):
        super().__init__("internvl", **kwargs)
        # ParameterError: main() prints it and exits 1
        for warning in check_command_line(
            command_line,
            self.get_fully_qualified_name(),
            rclpy_parameters=self.get_parameters_by_prefix(""),
        ):
            self.get_logger().warning(warning)
        params.declare(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.cameras = Cameras([])
        self._subscriber: CameraSubscriber | None = None
        self._camera_check = None
        self.jobs = JobQueue()
        self.outputs = Outputs(self)
        self.questions = self.create_subscription(
            String, "question", self._on_question, QUESTION_QOS
        )
        self.ask = AskServer(self)
        self.health = Heartbeat(self)
        # Steady time, not the node's clock: with use_sim_time and nothing on /clock yet, ROS time
        # stands at 0 and its timers never fire; the heartbeat must still beat, and say so.
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        self._heartbeat_timer = self.create_timer(
            self.get_parameter("heartbeat_period_s").value, self.health.beat, clock=self._steady
        )
        self.worker = Worker(self, self.jobs, self.outputs)

    # --- lifecycle -----------------------------------------------------------------------------
    def on_configure(self, state) -> TransitionCallbackReturn:
        try:
            self._configure()
        # rclpy's lifecycle would turn any other exception into a silent ERROR
        except Exception as e:
            known = isinstance(e, InternVLError)
            self.configure_error = str(e) if known else f"internal error: {type(e).__name__}: {e}"
            self.get_logger().error(f"cannot configure: {self.configure_error}")
            return TransitionCallbackReturn.FAILURE
        self.jobs.state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        p = {name: self.get_parameter(name).value for name in params.PARAMETERS}
        if not p["model_dir"] and not p["server_url"]:
            raise params.ParameterError(
                "model_dir: not set (the internvl-export output, or a Pulsar2 directory; or set "
                "server_url to answer through a server)"
            )
        topics = []
        for name in p["image_topics"]:
            try:
                topics.append(self.resolve_topic_name(name))
            except Exception as e:  # rclpy raises its name validation errors and RCLError
                raise params.ParameterError(
                    f"image_topics: {name!r} is not a valid topic name ({e})"
                ) from e
        # each frame would go in twice
        if twice := sorted({t for t in topics if topics.count(t) > 1}):
            raise params.ParameterError(f"image_topics: {', '.join(twice)} named more than once")
        answerer = remote_answerer(p) if p["server_url"] else local_answerer(p)
        self.worker.answerer, self.outputs.backend = answerer, answerer.backend
        self.cameras = Cameras(topics)
        self._subscriber = CameraSubscriber(self, self.cameras, p["camera_qos"], self._on_image)
        where = (
            f"answering through {answerer.describe()}"
            if p["server_url"]
            else f"model {p['model_dir']} loaded on {answerer.describe()}"
        )
        self.get_logger().info(
            f"{where}; cameras: {', '.join(topics) or 'none'}; {self.outputs.detections.describe()}"
        )

    def on_activate(self, state) -> TransitionCallbackReturn:
        self._subscriber.start()
        self._camera_check = self.create_timer(1.0, self._check_cameras, clock=self._steady)
        self.jobs.activate()
        self.get_logger().info("active: answering questions")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        self._stop_serving("the node was deactivated")
        self.jobs.state = "inactive"
        self.get_logger().info(
            "inactive: questions are answered with an error until it is activated again"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        self.worker.answerer, self._subscriber, self.cameras = None, None, Cameras([])
        self.outputs.backend = ""
        self.jobs.state = "unconfigured"
        self.get_logger().info("model unloaded")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        self._stop_serving("the node is shutting down")
        self.worker.answerer, self.jobs.state = None, "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state) -> TransitionCallbackReturn:
        self._stop_serving("the node failed")
        return TransitionCallbackReturn.SUCCESS

    def _stop_serving(self, reason: str, close: bool = False) -> None:
        """Inactive from now: the running answer is cancelled, waiting ones answered, cameras
        dropped."""
        was_active = self.jobs.active
        for job in self.jobs.stop(reason, close):
            self.outputs.error(job, CancelledError(f"cancelled: {reason}"))
        if was_active and self._subscriber is not None:
            self._subscriber.stop()
        if self._camera_check is not None:
            self.destroy_timer(self._camera_check)
            self._camera_check = None

    # --- callbacks: store or enqueue, nothing else -----------------------------------------------
    def _on_image(self, index: int, msg) -> None:
        stamp = Time.from_msg(msg.header.stamp).nanoseconds * 1e-9 or self.now()
        self.cameras.add(
            index,
            Frame(self.cameras.cameras[index].topic, stamp, msg),
            self.get_parameter("video.window_s").value,
            self.get_parameter("video.max_buffered_frames").value,
        )

    def _on_question(self, msg: String) -> None:
        self.submit(self.jobs.new_job(msg.data))

    def submit(self, job: Job) -> None:
        """Queue ``job`` under the on_busy policy, or answer it with why not."""
        refusals = self.jobs.submit(
            job, self.get_parameter("on_busy").value, self.get_parameter("queue_size").value
        )
        for old in refusals.preempted:
            self.outputs.error(old, CancelledError("cancelled: preempted by a newer question"))
        if refusals.refused is not None:
            self.outputs.error(job, refusals.refused)

    def _check_cameras(self) -> None:
        for change in self._subscriber.check():
            self.get_logger().warning(
                change
            ) if "publishers of" in change else self.get_logger().info(change)

    def _on_set_parameters(self, changes):
        result = params.validate(changes)
        if result.successful:
            for p in changes:
                if p.name == "heartbeat_period_s":  # takes effect now, not at the next beat
                    self._heartbeat_timer.timer_period_ns = int(float(p.value) * 1e9)
                    self._heartbeat_timer.reset()
        return result

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def close(self) -> None:
        """Stop serving and the worker (after shutdown, or when the node could not start)."""
        self._stop_serving("the node is shutting down", close=True)
        self.worker.join(timeout=10)
