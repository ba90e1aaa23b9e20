"""The node answering correctly about the toy model's pictures and clips sent over DDS, so channel
order, encodings, normalisation, image order and frame order are checked by meaning."""

from __future__ import annotations

import math
import os
import subprocess
import time

import numpy as np
import pytest
import rclpy
from conftest import TOY
from ros_harness import BIN, RELIABLE, compressed_msg, image_msg
from test_node import deliver, running_node
from test_toy import RED_CIRCLE

from internvl_engine.grounding import iou
from internvl_ros.bags import write_bag
from internvl_ros.client import AskClient
from internvl_toy.evaluate import MIN_IOU
from internvl_toy.scenes import CLIP_FRAMES, Shape, ground_task, moving_clip, render


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


GROUND_SCENES = 100
# The toy's grounding on 640x480 frames, larger than any training scene: 98.8 % of 2500 fresh scenes
# through the engine (the model card; seed 70000's 100 below are the hardest of its first five:
# 95 %), above the 97.5 % of accuracy.json's mix of training sizes.
GROUND_640X480 = 0.988


def boxes_of(result) -> list[tuple[float, float, float, float]]:
    return [(b.x_min, b.y_min, b.x_max, b.y_max) for b in result.boxes]


@pytest.fixture
def grounding_node(toy_model, tmp_path, ros):
    """The node on one camera (reliable, 640x480 frames from the tests), an Ask client, and every
    vision_msgs/Detection2DArray it publishes."""
    from vision_msgs.msg import Detection2DArray

    with running_node(
        toy_model,
        tmp_path,
        max_new_tokens=64,
        max_frame_age_s=30.0,  # internvl-ask takes seconds to start
        camera_qos="reliable",
        image_topics="[camera/image_raw]",
    ) as (proc, client):
        detections = []
        client.node.create_subscription(
            Detection2DArray, "detections", lambda m: client._add(detections, m), RELIABLE
        )
        asker = AskClient()
        try:
            yield proc, client, asker, detections
        finally:
            asker.close()


def camera_frame(rgb, frame_id: str = "camera_optical"):
    msg = image_msg(rgb, "rgb8")
    msg.header.frame_id = frame_id
    return msg


def test_node_finds_the_named_shape_in_the_camera_frame(grounding_node, toy_model):
    """100 fresh 640x480 scenes (the training scenes are at most 480 wide), shapes anywhere: the
    node's boxes, in pixels of the published frame, overlap the true one (IoU >= 0.5) as often as
    the engine's own boxes for the same pictures do, so nothing is lost between the answer's
    0..1000 and the frame's pixels, and as often as the model card says (GROUND_640X480; the
    grounding issue asks for 90 %); each answer's detections carry that frame's stamp and
    frame_id, and the same boxes."""
    from internvl_engine import Engine, GenerationConfig, Request

    _, client, asker, detections = grounding_node
    rng = np.random.default_rng(70_000)  # apart from training's and the evaluation's seeds
    scenes = [ground_task(rng, 640, 480) for _ in range(GROUND_SCENES)]
    overlaps = []
    for i, scene in enumerate(scenes):
        msg = camera_frame(scene.images[0])
        deliver(client, "/camera/image_raw", msg)  # stamped now; the node's latest frame
        result = asker.ask(ground=scene.ground, timeout=60)
        assert result.ok, result.error
        frame = result.answer.frames[0]
        assert (frame.width, frame.height, frame.frame_id) == (640, 480, "camera_optical")
        assert frame.stamp == msg.header.stamp
        found = boxes_of(result)
        overlaps.append(max((iou(b, scene.box) for b in found), default=0.0))
        client.wait_for(lambda: len(detections) > i, 10, "the answer's detections")
        array = detections[i]
        assert array.header.stamp == msg.header.stamp
        assert array.header.frame_id == "camera_optical"
        assert len(array.detections) == len(found)
        for detection, box in zip(array.detections, result.boxes):
            assert detection.header == array.header
            assert detection.bbox.center.position.x == pytest.approx((box.x_min + box.x_max) / 2)
            assert detection.bbox.size_y == pytest.approx(box.y_max - box.y_min)
            assert detection.results[0].hypothesis.class_id == box.label
    engine = Engine(toy_model, threads=1)
    own = [
        engine.answer(
            Request("", images=s.images, ground=s.ground), GenerationConfig(max_new_tokens=64)
        ).boxes
        for s in scenes
    ]
    engine_hits = sum(
        max((iou(b.corners, s.box) for b in found), default=0.0) >= MIN_IOU
        for found, s in zip(own, scenes)
    )
    hits = sum(o >= MIN_IOU for o in overlaps)
    print(f"boxes at IoU >= {MIN_IOU}: node {hits}, engine {engine_hits} of {GROUND_SCENES}")
    # the node's threads may round a box at the threshold the other way
    assert abs(hits - engine_hits) <= 2, (hits, engine_hits)
    p = GROUND_640X480
    floor = p - 3 * math.sqrt(p * (1 - p) / GROUND_SCENES) - 0.02  # as test_toy's fresh scenes
    assert hits / GROUND_SCENES >= floor, (hits, floor, sorted(overlaps)[:15])
    assert f"it is **{100 * p:.1f} %** of 2500" in (TOY / "README.md").read_text()


def test_a_cut_off_box_is_reported_and_the_node_goes_on(grounding_node):
    """max_new_tokens ends the answer inside its box: no box, the reason in the result and the
    status, an empty detections array for the frame (nothing found), and the next goal is
    answered."""
    _, client, asker, detections = grounding_node
    scene = ground_task(np.random.default_rng(3), 640, 480)
    deliver(client, "/camera/image_raw", camera_frame(scene.images[0]))
    cut = asker.ask(ground=scene.ground, max_new_tokens=12, timeout=60)
    assert cut.ok and cut.answer.finish_reason == "length", cut.error
    assert cut.boxes == []
    assert (
        len(cut.answer.box_problems) == 1 and "cut off before its end" in cut.answer.box_problems[0]
    )
    client.wait_for(lambda: detections, 10, "the detections")
    assert detections[0].detections == []
    status = client.statuses[-1]
    assert "name no place" in status.message and "cut off" in status.message
    whole = asker.ask(ground=scene.ground, timeout=60)
    assert whole.ok and len(whole.boxes) == 1
    deliver(client, "/camera/image_raw", camera_frame(scene.images[0]))  # fresh again
    shell = subprocess.run(
        [str(BIN / "internvl-ask"), "--ground", scene.ground, "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert shell.returncode == 0, shell.stderr
    assert f"box '{scene.ground}': x " in shell.stdout and "(640x480)" in shell.stdout
    bad = asker.ask(ground="a <box> b", timeout=60)
    assert not bad.ok and "must not hold" in bad.error
    both = asker.ask("What color is the shape?", ground=scene.ground, timeout=60)
    assert not both.ok and "not both" in both.error


def test_without_vision_msgs_the_node_serves_boxes_in_its_own_messages(toy_model, tmp_path, ros):
    """A ROS install without vision_msgs: the start-up line says the detections topic is off and
    why; the boxes are still in the Ask result."""
    hidden = [p for p in os.environ["PYTHONPATH"].split(os.pathsep) if "vision_msgs" not in p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(hidden)}
    scene = ground_task(np.random.default_rng(4), 640, 480)
    with running_node(
        toy_model,
        tmp_path,
        env=env,
        max_new_tokens=64,
        camera_qos="reliable",
        image_topics="[camera/image_raw]",
    ) as (proc, client):
        asker = AskClient()
        try:
            deliver(client, "/camera/image_raw", camera_frame(scene.images[0]))
            result = asker.ask(ground=scene.ground, timeout=60)
        finally:
            asker.close()
        assert result.ok and len(result.boxes) == 1, result.error
        assert "detections topic off: no vision_msgs (No module named 'vision_msgs'" in proc.log()
        assert not client.node.get_publishers_info_by_topic("/detections")
