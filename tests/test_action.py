"""Navigation-stack integration over real DDS, the node as its own process: the Ask action (choices
with probabilities, feedback, cancel, preemption, the on_busy policies, unknown cameras), the typed
answer topics, and the managed lifecycle driven by a client and by ros2 lifecycle / ros2 action."""

from __future__ import annotations

import _thread
import contextlib
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest
import rclpy
from images import noise_image
from internvl_msgs.msg import Answer
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from ros_harness import image_msg
from ros_tools import needs_ros_tools, shell, stop_ros2_daemon
from test_node import deliver, running_node

from internvl_engine import GenerationConfig, Request
from internvl_ros.client import AskClient, wait_future
from internvl_ros.params import MAX_NEW_TOKENS
from internvl_toy.scenes import COLORS, samples

LONG = 600  # tokens: long enough that later questions arrive while the first is running


@pytest.fixture(scope="module", autouse=True)
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


@pytest.fixture
def vision():
    client = AskClient()
    yield client
    client.close()


@pytest.mark.parametrize("task, choices", [("color", list(COLORS)), ("is_there", ["yes", "no"])])
def test_choices_pick_the_answer_at_least_as_often_as_the_free_answer(
    toy_model, tmp_path, vision, task, choices
):
    """The colour among the card's five names, and a yes/no question ("Is there a red shape?")."""
    free_right = chosen_right = 0
    right_probabilities = []
    scenes = samples(task, 30, seed=40_000)
    with running_node(toy_model, tmp_path, max_new_tokens=6, camera_qos="reliable") as (
        node,
        client,
    ):
        for sample in scenes:
            deliver(client, "/image_raw", image_msg(sample.images[0], "rgb8"))
            free = vision.ask(sample.question, timeout=60)
            chosen = vision.ask(sample.question, choices=choices, timeout=60)
            # the node logs each answer
            assert free.ok and chosen.ok, (
                free.error,
                chosen.error,
                node.log()[-1000:],
            )
            assert chosen.choice in choices and len(chosen.probabilities) == len(choices)
            assert abs(sum(chosen.probabilities) - 1) < 1e-4
            free_right += free.text.strip() == sample.answer
            chosen_right += chosen.choice == sample.answer
            right_probabilities.append(chosen.probabilities[choices.index(sample.answer)])
    print(
        f"\n{task} on {len(scenes)} fresh scenes: free answer {free_right}, choices {chosen_right} "
        "right; "
        f"mean probability of the right answer {np.mean(right_probabilities):.3f}"
    )
    assert chosen_right >= free_right and chosen_right >= len(scenes) - 1
    assert np.mean(right_probabilities) > 0.9


def test_a_goal_streams_and_its_answer_is_matched_on_the_topics(
    tiny_model, engine, tmp_path, vision
):
    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=12) as (_, client):
        streamed = []
        result = vision.ask("Tell me about the door.", on_chunk=streamed.append)
        assert result.ok and result.status == "succeeded"
        expected = engine.answer(
            Request("Tell me about the door."), GenerationConfig(max_new_tokens=12)
        )
        assert result.text == expected.text == "".join(streamed)
        # the pieces came as feedback (the client adds only a tail the result brought)
        assert len(streamed) > 1
        assert result.answer.timings.generated_tokens == len(expected.token_ids)
        assert result.choice is None and result.answer.choice_index == -1
        rid = result.answer.request_id
        client.wait_for(
            lambda: any(c.request_id == rid and c.final for c in client.typed_chunks),
            10,
            "final chunk",
        )
        mine = [c for c in client.typed_chunks if c.request_id == rid]
        assert [c.index for c in mine] == list(range(len(mine))) and mine[
            -1
        ].finish_reason == "length"
        assert "".join(c.text for c in mine) == result.text
        assert [r.text for r in client.results if r.request_id == rid] == [result.text]
        status = next(
            s for s in client.statuses if client.status_values(s)["request_id"] == str(rid)
        )
        assert client.status_values(status)["source"] == "goal"


def test_a_goal_naming_an_unknown_camera_is_aborted(tiny_model, tmp_path, vision):
    with running_node(tiny_model, tmp_path, image_topics="[front/image_raw]") as (_, client):
        result = vision.ask("What is there?", cameras=["back/image_raw"])
        assert result.status == "aborted" and result.answer.error_code == Answer.UNKNOWN_CAMERA
        assert (
            "unknown camera /back/image_raw (the node's cameras: /front/image_raw)"
            in result.answer.error_msg
        )
        deliver(client, "/front/image_raw", image_msg(noise_image(40, 40), "rgb8"))
        assert vision.ask("What is there?", cameras=["front/image_raw"], max_new_tokens=2).ok
        empty = vision.ask("Which?", choices=["yes", ""])
        assert empty.status == "aborted" and empty.answer.error_code == Answer.INVALID_QUESTION
        # was answered: 'yes' at 0.5, 'yes' at 0.5
        twice = vision.ask("Which?", choices=["yes", "no", "yes"])
        assert twice.status == "aborted" and twice.answer.error_code == Answer.INVALID_QUESTION
        assert twice.answer.error_msg.endswith("choices must differ: 'yes' is given twice"), (
            twice.answer.error_msg
        )
        # ran to the end of the KV cache
        endless = vision.ask("What is there?", max_new_tokens=4097)
        assert endless.status == "aborted" and endless.answer.error_code == Answer.INVALID_QUESTION
        assert endless.answer.error_msg == (
            "max_new_tokens 4097 is above 4096, the most the max_new_tokens parameter takes"
        ), endless.answer.error_msg


def test_errors_in_on_chunk_or_the_question_come_out_of_ask_and_the_client_goes_on(
    tiny_model, tmp_path, vision
):
    streamed = []

    def on_chunk(text):
        streamed.append(text)
        raise ValueError("the caller's on_chunk failed")

    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=12):
        with pytest.raises(ValueError, match="the caller's on_chunk failed"):
            vision.ask("Tell me about the door.", on_chunk=on_chunk, timeout=20)
        assert len(streamed) == 1  # the stream ended at the error
        assert vision.ask("Tell me about the door.", timeout=20).ok  # the client still spins
        # a question that cannot be sent (a lone surrogate: undecodable bytes read with
        # surrogateescape)
        with pytest.raises(UnicodeEncodeError):
            vision.ask("Is the door open? \udcff", timeout=20)
        assert vision.ask("Is the door open?", timeout=20).ok
        for timeout in (float("nan"), 0, -1):  # NaN waited for ever
            with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
                vision.ask("Is the door open?", timeout=timeout)
        for question, choices in [
            ("Is the door\0 open?", ()),
            ("Is the door open?", ("yes", "n\0o")),
        ]:
            with pytest.raises(ValueError, match="holds a NUL character, where a ROS string ends"):
                # it would arrive as "Is the door"
                vision.ask(question, choices=choices, timeout=20)


def _ask_in_background(vision, question: str, **kwargs) -> tuple[threading.Thread, dict]:
    out = {}
    thread = threading.Thread(
        target=lambda: out.update(result=vision.ask(question, timeout=120, **kwargs))
    )
    thread.start()
    return thread, out


def test_cancel_and_preempt_a_goal(endless_model, tmp_path, vision):
    with running_node(
        endless_model, tmp_path, mode="text", max_new_tokens=MAX_NEW_TOKENS, on_busy="preempt"
    ) as (_, client):
        chunks = []
        thread, out = _ask_in_background(vision, "Tell me a long story.", on_chunk=chunks.append)
        client.wait_for(lambda: len(client.chunks) > 3, 30, "the answer to start")
        vision.cancel()
        thread.join(60)
        cancelled = out["result"]
        assert cancelled.status == "canceled" and cancelled.answer.error_code == Answer.CANCELLED
        # with its partial text
        assert cancelled.answer.finish_reason == "cancelled" and cancelled.text
        assert (
            cancelled.text == "".join(chunks)
            and cancelled.answer.error_msg == "cancelled: cancelled by its client"
        )

        thread, out = _ask_in_background(vision, "Tell me another long story.")
        # counted by request: the first answer's stream chunks can still be arriving, and its
        # feedback may have brought its last ones as one piece, so len(chunks) does not count them
        first = cancelled.answer.request_id
        client.wait_for(
            lambda: sum(c.request_id > first and not c.final for c in client.typed_chunks) > 3,
            30,
            "the second answer to start",
        )
        client.ask("And now?")
        thread.join(60)
        client.wait_for(
            lambda: any(r.question == "And now?" for r in client.results), 120, "the topic answer"
        )
        preempted = out["result"]
        assert preempted.status == "aborted" and preempted.answer.error_code == Answer.CANCELLED
        assert (
            preempted.answer.error_msg == "cancelled: preempted by a newer question"
            and preempted.text
        )
        assert next(r for r in client.results if r.question == "And now?").error_code == Answer.NONE
        finals = [c for c in client.typed_chunks if c.final]
        assert [c.finish_reason for c in finals if c.request_id == preempted.answer.request_id] == [
            "cancelled"
        ]


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler, as a script run from a terminal has it. A shell starts its
    background jobs with SIGINT ignored, and Python then keeps ignoring it: interrupt_main() would
    do nothing in a test suite started that way."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_ask_cancels_the_goal_on_the_node(
    endless_model, tmp_path, vision, ctrl_c_raises
):
    """A script stopped with Ctrl-C while it waits for an answer: the KeyboardInterrupt comes out of
    ask(), and the node stops that answer (cancelled by its client) instead of finishing it for no
    one."""
    interrupted = []
    question = "Tell me a long story."

    with running_node(endless_model, tmp_path, mode="text", max_new_tokens=MAX_NEW_TOKENS) as (
        node,
        client,
    ):

        def on_chunk(text):
            # The first piece: the node has ~4,000 tokens to go (over 0.6 s); Ctrl-C lands in the
            # waiting ask()
            if not interrupted:
                interrupted.append(text)
                _thread.interrupt_main()

        with pytest.raises(KeyboardInterrupt):
            result = vision.ask(question, on_chunk=on_chunk, timeout=60)
            seen = "a chunk" if interrupted else "no chunk"
            pytest.fail(
                f"ask() returned {result.status} ({result.error!r}, {len(result.text)} "
                f"characters, {seen} seen) instead of raising; the node's log:\n{node.log()}"
            )
        client.wait_for(lambda: any(r.question == question for r in client.results), 30, "result")
        result = next(r for r in client.results if r.question == question)
        assert (result.error_code, result.error_msg) == (
            Answer.CANCELLED,
            "cancelled: cancelled by its client",
        ), f"{len(result.text)} characters answered; the node's log:\n{node.log()}"
        assert vision.ask("Is the door open?", timeout=20).ok  # the client goes on


# where rclpy's action client can be preempted with harm: between adding itself to the node and
# having its lock (kilted), and between sending a request and filing its future
RCLPY_ACTION_CLIENT_FUNCTIONS = {
    "__init__",
    "send_goal_async",
    "_get_result_async",
    "_cancel_goal_async",
}


@contextlib.contextmanager
def paused_inside_rclpy_action_client(pause_s: float = 0.002):
    """This thread, and every thread started here, sleeps ``pause_s`` at each line of those
    functions of rclpy's action client, as a thread preempted there would: others run meanwhile."""

    def pause(frame, event, arg):
        if event == "line":
            time.sleep(pause_s)
        return pause

    def trace(frame, event, arg):
        code = frame.f_code
        in_action_client = code.co_filename.endswith("rclpy/action/client.py")
        return pause if in_action_client and code.co_name in RCLPY_ACTION_CLIENT_FUNCTIONS else None

    threading.settrace(trace)
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(None)
        threading.settrace(None)


def test_goals_are_answered_when_rclpy_is_preempted_inside_the_action_client(tiny_model, tmp_path):
    """rclpy's action client files a request's future after sending the request (Humble; kilted's
    rclpy files a second one after the first): a fast response that the spinning thread takes in
    between reaches no future, and the goal hangs (ros2/rclpy#1123). Kilted's also joins the node
    before it has its lock, and a thread already spinning the node dies on it. AskClient spins only
    once its action client is whole, and sends from the spinning thread."""
    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=8):
        with paused_inside_rclpy_action_client():
            vision = AskClient()
            try:
                for i in range(5):
                    streamed = []
                    answered = vision.ask(f"Question {i}?", on_chunk=streamed.append, timeout=20)
                    assert answered.ok, answered.error
                    assert (
                        answered.answer.question == f"Question {i}?"
                        and answered.text == "".join(streamed)
                    )
            finally:
                vision.close()


@pytest.mark.parametrize("policy", ["queue", "drop", "preempt"])
def test_goals_while_busy(tiny_model, tmp_path, policy):
    first_client, second_client = AskClient(), AskClient()
    try:
        with running_node(
            tiny_model, tmp_path, mode="text", max_new_tokens=LONG, on_busy=policy
        ) as (_, client):
            first, first_out = _ask_in_background(first_client, "Tell me a long story.")
            client.wait_for(lambda: len(client.chunks) > 3, 30, "the first answer to start")
            second = second_client.ask("Tell me a long story too.", timeout=120)
            first.join(120)
            earlier = first_out["result"]
    finally:
        first_client.close()
        second_client.close()
    if policy == "queue":  # the second waits its turn
        assert earlier.ok and second.ok and second.answer.request_id > earlier.answer.request_id
        assert second.answer.timings.queue_wait_ms > 0
    elif policy == "drop":  # refused with the reason (a goal rejection could not say why)
        assert earlier.ok and second.status == "aborted" and second.answer.error_code == Answer.BUSY
        assert second.answer.error_msg == "busy: question dropped (on_busy=drop)"
    else:
        assert (
            earlier.status == "aborted"
            and earlier.answer.error_code == Answer.CANCELLED
            and second.ok
        )


def change_state(node, transition: int) -> bool:
    client = node.create_client(ChangeState, "/internvl/change_state")
    assert client.wait_for_service(30)
    return wait_future(
        client.call_async(ChangeState.Request(transition=Transition(id=transition))), 60
    ).success


def get_state(node) -> str:
    client = node.create_client(GetState, "/internvl/get_state")
    assert client.wait_for_service(30)
    return wait_future(client.call_async(GetState.Request()), 30).current_state.label


def test_lifecycle_from_a_client(tiny_model, tmp_path, vision):
    """Deactivate stops serving and drops the cameras; cleanup frees the model; questions and goals
    in between are answered with an error, never silence."""
    frame = image_msg(noise_image(40, 40, seed=4), "rgb8")
    with running_node(tiny_model, tmp_path, max_new_tokens=3) as (proc, client):
        node = client.node
        deliver(client, "/image_raw", frame)
        assert not client.ask_and_wait("Anything?").startswith("ERROR")
        assert get_state(node) == "active"
        assert (
            change_state(node, Transition.TRANSITION_DEACTIVATE) and get_state(node) == "inactive"
        )
        client.wait_for(
            lambda: node.count_subscribers("/image_raw") == 0, 10, "the camera subscription to go"
        )
        inactive = vision.ask("Anything?")
        assert inactive.status == "aborted" and inactive.answer.error_code == Answer.INACTIVE
        assert "not active (lifecycle state inactive)" in inactive.answer.error_msg
        assert client.ask_and_wait("Anything?").startswith(
            "ERROR: the node is not active (lifecycle state inactive)"
        )
        assert (
            change_state(node, Transition.TRANSITION_CLEANUP) and get_state(node) == "unconfigured"
        )
        client.wait_for(
            lambda: client.status_values(client.heartbeats[-1])["model_loaded"] == "false",
            10,
            "unload",
        )
        assert "lifecycle state unconfigured" in vision.ask("Anything?").answer.error_msg
        assert change_state(node, Transition.TRANSITION_CONFIGURE) and change_state(
            node, Transition.TRANSITION_ACTIVATE
        )
        deliver(client, "/image_raw", frame)
        assert vision.ask("Anything?", max_new_tokens=3).ok
        assert (
            change_state(node, Transition.TRANSITION_ACTIVE_SHUTDOWN)
            and get_state(node) == "finalized"
        )
        assert "lifecycle state finalized" in vision.ask("Anything?").answer.error_msg
    assert proc.proc.returncode == 0


def test_without_autostart_a_lifecycle_manager_brings_it_up(tiny_model, tmp_path, vision):
    with running_node(
        tiny_model, tmp_path, ready=False, autostart="false", mode="text", max_new_tokens=2
    ) as (_, client):
        client.wait_for(lambda: client.heartbeats, 60, "the node")
        assert get_state(client.node) == "unconfigured"
        assert vision.ask("Hi").answer.error_code == Answer.INACTIVE
        assert change_state(client.node, Transition.TRANSITION_CONFIGURE)
        assert change_state(client.node, Transition.TRANSITION_ACTIVATE)
        assert vision.ask("Hi").ok


def test_ros2_lifecycle_and_send_goal_as_docs_show(toy_model, tmp_path):
    """docs/navigation.md's commands, typed in a shell."""
    needs_ros_tools("ros2")
    picture = samples("color", 1, seed=50_000)[0]
    try:  # the ros2 CLI takes seconds to start: the frame must stay fresh meanwhile
        with running_node(
            toy_model, tmp_path, max_new_tokens=6, camera_qos="reliable", max_frame_age_s=60.0
        ) as (_, client):
            deliver(client, "/image_raw", image_msg(picture.images[0], "rgb8"))
            goal = shell(
                "ros2 action send_goal /ask internvl_msgs/action/Ask "
                """"{question: 'What color is the shape?', """
                """choices: [red, green, blue, yellow, purple]}" """
            )
            assert "Goal finished with status: SUCCEEDED" in goal.stdout, goal.stdout + goal.stderr
            assert re.search(rf"text: {picture.answer}\b", goal.stdout), goal.stdout
            assert (
                "Transitioning successful"
                in shell(
                    "ros2 lifecycle set /internvl deactivate", expect="Transitioning successful"
                ).stdout
            )
            assert shell("ros2 lifecycle get /internvl", expect="inactive").stdout.startswith(
                "inactive"
            )
            refused = shell(
                "ros2 action send_goal /ask internvl_msgs/action/Ask \"{question: 'What color?'}\" "
            )
            assert (
                "Goal finished with status: ABORTED" in refused.stdout
                and "error_code: 8" in refused.stdout
            )
            assert (
                "Transitioning successful"
                in shell(
                    "ros2 lifecycle set /internvl activate", expect="Transitioning successful"
                ).stdout
            )
    finally:
        stop_ros2_daemon()
