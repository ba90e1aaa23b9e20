"""The trained toy checkpoint (models/internvl-toy): parity with transformers, accuracy through the
engine on fresh scenes, and the node answering correctly about pictures and clips sent over DDS,
so channel order, encodings, normalisation, image order and frame order are checked by meaning."""
from __future__ import annotations

import json
import math
import subprocess
import time

import pytest
import rclpy
from conftest import TOY, needs_torch
from ros_harness import BIN, compressed_msg, image_msg
from test_node import deliver, running_node
from test_parity import assert_matches_reference

from internvl_engine import Engine, Request
from internvl_ros.bags import write_bag
from internvl_toy.evaluate import accuracy, table_rows
from internvl_toy.scenes import CLIP_FRAMES, TASKS, VIDEO_TASKS, Shape, moving_clip, render

CARD = json.loads((TOY / "accuracy.json").read_text())
FRESH = 60  # questions per type here; the card used 200
RED_CIRCLE = render([Shape("circle", "red", 0.5, 0.5, 0.25)], 320, 240)


@pytest.fixture(scope="module")
def toy_engine(toy_model):
    return Engine(toy_model)


@pytest.fixture(scope="module")
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


def test_parity_with_transformers(toy_engine):
    needs_torch()
    from internvl_engine.reference import load_reference

    reference = load_reference(TOY, toy_engine.tokenizer.ids["<IMG_CONTEXT>"])
    assert_matches_reference(toy_engine, reference, Request("What color is the shape?", images=[RED_CIRCLE]))
    clip = moving_clip("square", "blue", "left")
    assert_matches_reference(toy_engine, reference, Request("Which way does the square move?", video_frames=clip))


def test_accuracy_on_fresh_scenes(toy_engine):
    report = accuracy(toy_engine, per_task=FRESH, seed=20_000)
    for task, result in report.items():
        p = CARD[task]["accuracy"]
        spread = math.sqrt(min(p, 0.99) * (1 - min(p, 0.99)) / FRESH)  # a card at 100 % may still miss one
        floor = p - 3 * spread - 0.02  # three standard errors below the card
        assert result["accuracy"] >= floor, f"{task}: {result['accuracy']:.2f} < {floor:.2f}: {result['wrong']}"


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_answer_as_fp32_does(toy_engine, precision, tmp_path):
    """The toy's accuracy through an int8 or int4 export (int8 ViT with either) stays within a point
    of fp32's, on the same fresh questions."""
    from internvl_engine.export import export

    export(TOY, tmp_path, precision=precision, log=lambda *_: None)
    fp32, quantized = (accuracy(e, per_task=FRESH, seed=30_000) for e in (toy_engine, Engine(tmp_path)))
    overall = [sum(r["accuracy"] for r in report.values()) / len(report) for report in (fp32, quantized)]
    assert abs(overall[0] - overall[1]) <= 0.01, {t: (fp32[t]["wrong"], quantized[t]["wrong"]) for t in fp32}


def test_model_card_matches_the_checkpoint():
    card = (TOY / "README.md").read_text()
    task_rows, group_rows = table_rows(CARD)
    assert len(task_rows) == len(TASKS) and len(group_rows) == 8  # where, is_there: 1-3 shapes; which_image: 2-3 images
    for row in task_rows + group_rows:
        assert row in card, row
    # The targets: 95 % for each picture question, 90 % for clips.
    assert min(CARD[t]["accuracy"] for t in TASKS if t not in VIDEO_TASKS) >= 0.95
    assert min(CARD[t]["accuracy"] for t in VIDEO_TASKS) >= 0.90


@pytest.mark.parametrize("tool, args, message", [
    ("internvl-eval-toy", [TOY, "--per-task", "0"], "--per-task must be >= 1 and --seed >= 0"),  # ZeroDivisionError
    ("internvl-eval-toy", [TOY, "--seed", "-1"], "--per-task must be >= 1 and --seed >= 0"),  # numpy's traceback
    ("internvl-eval-toy", ["missing"], "missing: no such checkpoint directory"),  # a ModelDirError traceback
    # --lr nan: the encoder stage ran for minutes, then the decoder stage would have stepped by NaN
    ("internvl-train-toy", ["--lr", "nan"], "--steps and --batch-size must be >= 1, --lr a number > 0"),
    ("internvl-train-toy", ["--steps", "0"], "--steps and --batch-size must be >= 1"),  # the encoder stage ran first
    ("internvl-train-toy", ["--threads", "-1"], "--seed and --threads must be >= 0"),  # torch's traceback
    ("internvl-train-toy", ["--from", "missing"], "--from missing: not a checkpoint directory"),
])
def test_toy_tools_refuse_bad_options_before_working(tool, args, message, tmp_path):
    if tool == "internvl-train-toy":
        needs_torch()
        args = ["--out", tmp_path / "out", *args]
    run = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"{tool}: error: {message}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_a_swapped_channel_order_changes_the_colour(toy_engine):
    """What the node test below relies on: red read as BGR is blue to this model."""
    ask = lambda image: toy_engine.answer(Request("What color is the shape?", images=[image])).text  # noqa: E731
    assert ask(RED_CIRCLE) == "red" and ask(RED_CIRCLE[..., ::-1].copy()) == "blue"


def test_node_sees_a_red_circle_in_every_encoding(toy_model, tmp_path, ros):
    with running_node(toy_model, tmp_path, max_new_tokens=6, max_images=1, max_frame_age_s=1.0,
                      camera_qos="reliable", image_topics="[image_raw, image_raw/compressed]") as (_, client):
        for encoding in ("rgb8", "bgr8", "rgba8", "bayer_rggb8", "yuv422_yuy2", "nv12", "nv24"):
            deliver(client, "/image_raw", image_msg(RED_CIRCLE, encoding))
            assert client.ask_and_wait("What color is the shape?").strip() == "red", encoding
            assert client.ask_and_wait("What shape is it?").strip() == "circle", encoding
        time.sleep(1.2)  # the raw camera goes stale; the JPEG one is used next
        deliver(client, "/image_raw/compressed", compressed_msg(RED_CIRCLE, "jpeg"))
        assert client.ask_and_wait("What color is the shape?").strip() == "red"
        assert client.ask_and_wait("What shape is it?").strip() == "circle"


@pytest.mark.parametrize("direction", ["right", "left"])
def test_node_tells_which_way_a_clip_moves(toy_model, tmp_path, ros, direction):
    """The same clip of a circle moving right, played forwards and reversed."""
    clip = moving_clip("circle", "green", "right", frames=2 * CLIP_FRAMES)
    if direction == "left":
        clip = clip[::-1]
    question = "Which way does the circle move?"
    bag = write_bag(tmp_path / "bag", [(0.1 * i, f) for i, f in enumerate(clip)], [(0.1 * len(clip) + 0.05, question)])
    with running_node(toy_model, tmp_path, mode="video", max_new_tokens=6,
                      **{"video.window_s": 0.1 * len(clip), "video.num_frames": CLIP_FRAMES}) as (_, client):
        subprocess.run([str(BIN / "internvl-play-bag"), str(bag), "--restamp", "--wait-for-subscribers", "20"],
                       check=True, capture_output=True, timeout=60)
        client.wait_for(lambda: client.answers, 30, "the answer")
        assert client.answers[0].strip() == direction


def test_two_cameras_reach_the_model_in_topic_order(toy_model, tmp_path, ros):
    """Two cameras in image mode: the node sends their latest frames as Image-1, Image-2 in
    ``image_topics`` order, so the model names the camera that sees the triangle."""
    triangle, circle = (render([Shape(shape, "blue", 0.5, 0.5, 0.25)], 320, 240) for shape in ("triangle", "circle"))
    with running_node(toy_model, tmp_path, max_new_tokens=6, camera_qos="reliable",
                      image_topics="[front/image_raw, back/image_raw]") as (_, client):
        for front, back, answer in ((triangle, circle, "Image-1"), (circle, triangle, "Image-2")):
            deliver(client, "/front/image_raw", image_msg(front, "rgb8"))
            deliver(client, "/back/image_raw", image_msg(back, "rgb8"))
            assert client.ask_and_wait("Which image has a triangle?").strip() == answer
