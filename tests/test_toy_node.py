"""The node answering correctly about the toy model's pictures and clips sent over DDS, so channel
order, encodings, normalisation, image order and frame order are checked by meaning."""

from __future__ import annotations

import subprocess
import time

import pytest
import rclpy
from ros_harness import BIN, compressed_msg, image_msg
from test_node import deliver, running_node
from test_toy import RED_CIRCLE

from internvl_ros.bags import write_bag
from internvl_toy.scenes import CLIP_FRAMES, Shape, moving_clip, render


@pytest.fixture(scope="module")
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


def test_node_sees_a_red_circle_in_every_encoding(toy_model, tmp_path, ros):
    with running_node(
        toy_model,
        tmp_path,
        max_new_tokens=6,
        max_images=1,
        max_frame_age_s=1.0,
        camera_qos="reliable",
        image_topics="[image_raw, image_raw/compressed]",
    ) as (_, client):
        for encoding in ("rgb8", "bgr8", "rgba8", "bayer_rggb8", "yuv422_yuy2", "nv12", "nv24"):
            deliver(client, "/image_raw", image_msg(RED_CIRCLE, encoding))
            assert client.ask_and_wait("What color is the shape?").strip() == "red", encoding
            assert client.ask_and_wait("What shape is it?").strip() == "circle", encoding
        time.sleep(1.2)  # the raw camera goes stale; the JPEG one is used next
        deliver(client, "/image_raw/compressed", compressed_msg(RED_CIRCLE, "jpeg"))
        assert client.ask_and_wait("What color is the shape?").strip() == "red"
        assert client.ask_and_wait("What shape is it?").strip() == "circle"


def answer_about_a_clip(model_dir, tmp_path, reverse: bool = False, **params) -> str:
    """The node's answer to "Which way does the circle move?" about a played bag of a circle
    moving right (``reverse``: left), in video mode; ``model_dir`` "" with ``server_url`` set."""
    clip = moving_clip("circle", "green", "right", frames=2 * CLIP_FRAMES)
    if reverse:
        clip = clip[::-1]
    question = "Which way does the circle move?"
    bag = write_bag(
        tmp_path / "bag",
        [(0.1 * i, f) for i, f in enumerate(clip)],
        [(0.1 * len(clip) + 0.05, question)],
    )
    video = {"video.window_s": 0.1 * len(clip), "video.num_frames": CLIP_FRAMES}
    with running_node(model_dir, tmp_path, mode="video", max_new_tokens=6, **video, **params) as (
        _,
        client,
    ):
        subprocess.run(
            [str(BIN / "internvl-play-bag"), str(bag), "--restamp", "--wait-for-subscribers", "20"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        client.wait_for(lambda: client.answers, 60, "the answer")
        return client.answers[0].strip()


@pytest.mark.parametrize("direction", ["right", "left"])
def test_node_tells_which_way_a_clip_moves(toy_model, tmp_path, ros, direction):
    """The same clip of a circle moving right, played forwards and reversed."""
    assert answer_about_a_clip(toy_model, tmp_path, reverse=direction == "left") == direction


def test_two_cameras_reach_the_model_in_topic_order(toy_model, tmp_path, ros):
    """Two cameras in image mode: the node sends their latest frames as Image-1, Image-2 in
    ``image_topics`` order, so the model names the camera that sees the triangle."""
    triangle, circle = (
        render([Shape(shape, "blue", 0.5, 0.5, 0.25)], 320, 240) for shape in ("triangle", "circle")
    )
    with running_node(
        toy_model,
        tmp_path,
        max_new_tokens=6,
        camera_qos="reliable",
        image_topics="[front/image_raw, back/image_raw]",
    ) as (_, client):
        for front, back, answer in ((triangle, circle, "Image-1"), (circle, triangle, "Image-2")):
            deliver(client, "/front/image_raw", image_msg(front, "rgb8"))
            deliver(client, "/back/image_raw", image_msg(back, "rgb8"))
            assert client.ask_and_wait("Which image has a triangle?").strip() == answer
