"""The node answering through internvl-serve (server_url): the demo's four questions answered right,
and a server that stops mid-question costs that question one clear error on every answer channel;
the node keeps serving and answers again when the server is back."""

from __future__ import annotations

import pytest
import rclpy
from internvl_msgs.msg import Answer
from ros_harness import image_msg
from test_node import deliver, running_node
from test_serve import CIRCLE, TRIANGLE, Server
from test_toy import RED_CIRCLE
from test_toy_node import answer_about_a_clip

from internvl_ros.interface import ERROR_PREFIX

pytest.importorskip("openai", reason="needs openai (requirements/serve.txt)")


@pytest.fixture(scope="module", autouse=True)
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


@pytest.fixture(scope="module")
def toy_server(toy_model, tmp_path_factory):
    server = Server(toy_model, log=tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()


def test_the_demos_questions_through_the_server(toy_server, tmp_path):
    remote = dict(server_url=toy_server.url, max_new_tokens=6, camera_qos="reliable")
    with running_node("", tmp_path, max_images=1, **remote) as (node, client):
        deliver(client, "/image_raw", image_msg(RED_CIRCLE, "rgb8"))
        assert client.ask_and_wait("What color is the shape?").strip() == "red"
        assert client.ask_and_wait("What shape is it?").strip() == "circle"
        assert client.ask_and_wait("How many shapes are there?").strip() == "one"
        assert f"answering through the server {toy_server.url}" in node.log()
    cameras = "[front/image_raw, back/image_raw]"
    with running_node("", tmp_path, image_topics=cameras, **remote) as (_, client):
        deliver(client, "/front/image_raw", image_msg(CIRCLE, "rgb8"))
        deliver(client, "/back/image_raw", image_msg(TRIANGLE, "rgb8"))
        assert client.ask_and_wait("Which image has a triangle?").strip() == "Image-2"
    assert answer_about_a_clip("", tmp_path, server_url=toy_server.url) == "right"


def test_a_server_that_stops_mid_question_and_comes_back(endless_model, tmp_path):
    server = Server(endless_model, log=tmp_path / "serve1.log")
    port = server.port
    try:
        with running_node(
            "", tmp_path, mode="text", server_url=server.url, max_new_tokens=4096
        ) as (node, client):
            client.ask("Tell me a long story.")
            client.wait_for(lambda: len(client.chunks) > 3, 30, "the answer to start")
            server.stop(kill=True)
            client.wait_for(lambda: client.results, 30, "the result")
            result = client.results[0]
            assert result.error_code == Answer.SERVER_UNREACHABLE, result
            assert (
                result.error_msg.startswith(f"{server.url}: ") and result.finish_reason == "error"
            )
            assert client.answers and client.answers[0].startswith(ERROR_PREFIX), client.answers
            # while it is down, each question is refused at once, and the node goes on
            client.ask("Still there?")
            client.wait_for(lambda: len(client.results) > 1, 30, "the second result")
            assert client.results[1].error_code == Answer.SERVER_UNREACHABLE
            assert "unreachable" in client.results[1].error_msg
            server = Server(endless_model, port=port, log=tmp_path / "serve2.log")
            client.ask("And now?")
            client.wait_for(lambda: len(client.results) > 2, 60, "the third result")
            assert client.results[2].error_code == Answer.NONE and client.results[2].text
            assert "Traceback" not in node.log()
    finally:
        server.stop()
