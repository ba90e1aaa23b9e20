"""The Ask action: a question with its own mode, cameras, choices and token limit; feedback streams
the answer; the result is the answer or an error code.

A goal the node will not run (busy, inactive, a bad mode) is accepted and aborted at once with the
error code and the reason, because a ROS 2 goal rejection carries no reason; a goal preempted by a
newer question ends aborted with error_code CANCELLED (ROS 2 lets a goal end canceled only when its
client asked).
"""

from __future__ import annotations

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.task import Future

from internvl_engine.errors import InternVLError, InvalidRequestError

from . import params
from .cameras import UnknownCameraError
from .interface import ANSWER_QOS
from .jobs import CancelledError
from .outputs import AnswerMsg, Ask


class AskServer:
    def __init__(self, node):
        self.node = node
        self._server = ActionServer(
            node,
            Ask,
            "ask",
            execute_callback=self._execute,
            goal_callback=lambda _: GoalResponse.ACCEPT,
            cancel_callback=self._cancel,
            callback_group=ReentrantCallbackGroup(),
            feedback_pub_qos_profile=ANSWER_QOS,
        )

    async def _execute(self, goal_handle):
        goal, node = goal_handle.request, self.node
        job = node.jobs.new_job(
            goal.question,
            mode=goal.mode,
            choices=tuple(goal.choices),
            ground=goal.ground,
            max_new_tokens=goal.max_new_tokens,
            goal=goal_handle,
            result=Future(),
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
            node.outputs.error(job, e)
        else:
            node.submit(job)
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
            return self.node.resolve_topic_name(name)
        except Exception as e:  # rclpy raises its name validation errors and RCLError
            raise UnknownCameraError(f"{name!r} is not a valid topic name ({e})") from e

    def _cancel(self, goal_handle) -> CancelResponse:
        unanswered, waiting = self.node.jobs.withdraw(goal_handle)
        if not unanswered:
            return CancelResponse.REJECT  # already answered
        if waiting is not None:
            self.node.outputs.error(waiting, CancelledError("cancelled by its client"))
        return CancelResponse.ACCEPT
