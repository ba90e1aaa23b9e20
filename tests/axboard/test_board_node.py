"""The ROS 2 node on the board stand-in: the axengine backend behind the node's topics, as on a
robot with an AX650N (needs rclpy: skipped in the Python 3.10 board job, which has no ROS
wheels)."""

from __future__ import annotations

import pytest

rclpy = pytest.importorskip(
    "rclpy", reason="the node needs rclpy (ROS 2); the Python 3.10 job has none"
)

from ros_harness import Client, NodeProcess  # noqa: E402

from internvl_engine import GenerationConfig, Request  # noqa: E402


def test_the_node_answers_through_pyaxengine(board_model, tiny_hf, board_engine, tmp_path):
    rclpy.init()
    node = NodeProcess(
        board_model,
        tmp_path / "node.log",
        params={
            "hf_model": tiny_hf,
            "backend": "axengine",
            "mode": "text",
            "max_new_tokens": 6,
            "heartbeat_period_s": 0.1,
        },
    )
    client = Client()
    try:
        client.wait_ready()
        answer = client.ask_and_wait("What is in front of the robot?")
        client.wait_for(lambda: client.statuses, 30, "the answer's status")
        values = client.status_values(client.statuses[0])
    finally:
        client.close()
        node.stop()
        rclpy.shutdown()
    assert (
        answer
        == board_engine.answer(
            Request("What is in front of the robot?"), GenerationConfig(max_new_tokens=6)
        ).text
    )
    assert values["backend"] == "axengine"
    assert float(values["decode_bytes_per_token"]) < 20_000  # the cache stayed in the NPU's buffers
    assert "Traceback" not in node.log() and "[INFO] Available providers" not in node.log()
