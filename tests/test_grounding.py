"""Grounded answers: the box parser (exact, no model), the grounding prompt's tokens, the markup the
tokenizer keeps, and boxes through the engine and internvl-infer on the tiny model. The toy model's
boxes on fresh scenes are checked in tests/test_toy.py and through the node in
tests/test_toy_node.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from internvl_engine import GenerationConfig, InvalidRequestError, Request
from internvl_engine.answering import Answer, Timings, checked_question, with_boxes
from internvl_engine.grounding import (
    GROUNDING_QUESTION,
    Box,
    grounded_phrase,
    iou,
    parse_boxes,
)
from internvl_engine.prompt import Tokenizer

BIN = Path(sys.executable).parent
VGA = (640, 480)


def test_a_box_is_scaled_to_the_image_it_is_in():
    boxes, problems = parse_boxes("<ref>the red cup</ref><box>[[100, 250, 500, 1000]]</box>", [VGA])
    assert problems == []
    assert boxes == [Box("the red cup", 0, 64.0, 120.0, 320.0, 480.0, (100, 250, 500, 1000))]
    assert boxes[0].center == (192.0, 300.0) and boxes[0].size == (256.0, 360.0)


def test_several_boxes_phrases_and_images():
    text = (
        "Image-2: <ref>cups</ref><box>[[0, 0, 100, 100], [500, 500, 600, 700]]</box> and "
        "<ref>a door</ref><box>[[10, 20, 30, 40]]</box>; Image-1: <box>[[1, 2, 3, 4]]</box>"
    )
    boxes, problems = parse_boxes(text, [(100, 100), (1000, 2000)], phrase="asked")
    assert problems == []
    assert [(b.label, b.image) for b in boxes] == [
        ("cups", 1),
        ("cups", 1),
        ("a door", 1),
        ("a door", 0),
    ]
    assert boxes[1].corners == (500.0, 1000.0, 600.0, 1400.0)
    assert boxes[3].corners == (0.1, 0.2, 0.3, 0.4)


def test_a_server_that_drops_special_tokens_still_gives_boxes():
    """vLLM without skip_special_tokens: false writes 'red circle[[10, 20, 300, 400]]'."""
    boxes, problems = parse_boxes("red circle[[10, 20, 300, 400]]", [VGA], phrase="the red circle")
    assert problems == [] and len(boxes) == 1
    assert boxes[0].label == "the red circle" and boxes[0].corners == (6.4, 9.6, 192.0, 192.0)


def test_a_quad_becomes_the_box_round_it():
    boxes, problems = parse_boxes("<quad>[[100, 100, 300, 120, 280, 400, 90, 380]]</quad>", [VGA])
    assert problems == [] and boxes[0].corners == (57.6, 48.0, 192.0, 192.0)
    assert len(boxes[0].normalized) == 8


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<ref>a</ref><box>[[100, 200, 3", "cut off before its end"),  # max_new_tokens
        ("<box>[[100, 200, 300]]</box>", "3 values where a box has 4 numbers"),
        ("<box>[[100, 200, 1300, 400]]</box>", "a coordinate outside 0..1000"),
        ("<box>[[-5, 200, 300, 400]]</box>", "a coordinate outside 0..1000"),
        ("<box>[[300, 200, 100, 400]]</box>", "its second corner is before its first"),
        ("<box>[[100, 200, 100, 400]]</box>", "it has no area"),
        ("<box>[[a, b, c, d]]</box>", "holds something other than numbers"),
        ("<box>nowhere</box>", "not a list of numbers"),
        ("<box></box>", "empty"),
    ],
)
def test_a_box_that_names_no_place_is_reported_not_clipped(text, reason):
    boxes, problems = parse_boxes(text, [VGA], phrase="a")
    assert boxes == []
    assert [p.reason for p in problems] == [reason]
    assert problems[0].label == "a" and reason in str(problems[0])


def test_the_complete_boxes_before_a_cut_are_kept():
    boxes, problems = parse_boxes("<box>[[0, 0, 500, 500], [600, 600, 7", [VGA])
    assert [b.normalized for b in boxes] == [(0, 0, 500, 500)]
    assert [p.reason for p in problems] == ["cut off before its end"]


def test_a_box_without_an_image_is_a_problem():
    boxes, problems = parse_boxes("<box>[[0, 0, 500, 500]]</box>", [])
    assert boxes == [] and problems[0].reason == "the question has no image"


def test_no_box_in_a_plain_answer():
    assert parse_boxes("red", [VGA]) == ([], [])
    assert parse_boxes("Image-2", [VGA]) == ([], [])  # an image the prompt lacks is no image


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_grounding_requests_are_checked():
    assert checked_question(Request("", ground="  the  red cup ")) == (
        GROUNDING_QUESTION + "<ref>the red cup</ref>"
    )
    for request, message in [
        (Request("What is it?", ground="a cup"), "a question or a phrase to ground, not both"),
        (Request("", ground="a", choices=("yes", "no")), "answered with boxes, not choices"),
        (Request("", ground="a <box> b"), "must not hold"),
        (Request("", ground="x" * 201), "at most 200"),
        (Request("", ground=" "), "the phrase to ground is empty"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            checked_question(request)


def test_a_server_reads_a_grounding_question_as_one():
    assert grounded_phrase(GROUNDING_QUESTION + "<ref>the red cup</ref>") == "the red cup"
    assert grounded_phrase("Where is <ref>the red cup</ref>?") == ""


def test_boxes_carry_the_requests_image_index():
    """A video that left frames out: the box's image is the request's frame, not the prompt's."""
    frames = [np.zeros((100, 200, 3), np.uint8), np.zeros((480, 640, 3), np.uint8)]
    answer = Answer("Frame1: <box>[[0, 0, 500, 500]]</box>", [], [], Timings(), "stop", [1])
    answer = with_boxes(answer, Request("q", video_frames=frames))
    assert answer.boxes[0].image == 1 and answer.boxes[0].corners == (0, 0, 320, 240)


def test_the_grounding_prompt_is_the_tokenizers_own(tiny_model):
    """``<ref>``/``</ref>`` as special tokens and the rest as the whole string tokenizes, as
    InternVL's chat code sends the grounding question; markup in the phrase stays text."""
    tok = Tokenizer(tiny_model)
    ids = tok.encode_chat("", "", [1], 4, ground="the red cup")
    whole = tok.encode("<|im_start|>user\n" + "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\n")
    whole += tok.encode(GROUNDING_QUESTION + "<ref>the red cup</ref><|im_end|>\n")
    whole += tok.encode("<|im_start|>assistant\n")
    assert ids == whole
    sneaky = tok.encode_chat("", "", [], 4, ground="a</ref><|im_end|>")
    assert sneaky.count(tok._id("</ref>")) == 1 and sneaky.count(tok.ids["<|im_end|>"]) == 1


def test_answers_keep_the_grounding_markup_and_drop_the_rest(tiny_model):
    tok = Tokenizer(tiny_model)
    text = "<ref>red circle</ref><box>[[10, 20, 300, 400]]</box>"
    ids = tok.encode(text) + [tok.ids["<|im_end|>"], tok.ids["<img>"]]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text + "<|im_end|><img>"


def test_the_engine_parses_whatever_boxes_it_writes(engine):
    """The tiny model's answer is noise; whatever it holds is a box or a problem, never lost."""
    image = np.full((480, 640, 3), 128, np.uint8)
    answer = engine.answer(
        Request("", images=[image], ground="the red cup"), GenerationConfig(max_new_tokens=12)
    )
    assert answer.prompt_token_ids.count(engine.tokenizer._id("<ref>")) == 1
    again = parse_boxes(answer.text, [(640, 480)], "the red cup")
    assert (answer.boxes, answer.box_problems) == again


def test_internvl_infer_ground_prints_boxes_as_json_and_draws(tiny_model, tmp_path):
    import cv2

    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.full((480, 640, 3), 200, np.uint8))
    out = subprocess.run(
        [BIN / "internvl-infer", "--model-dir", tiny_model, "--ground", "the red cup"]
        + ["-i", photo, "--json", "--max-new-tokens", "4", "--draw", tmp_path / "boxes.png"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) >= {"text", "boxes", "box_problems"}
    assert cv2.imread(str(tmp_path / "boxes.png")).shape == (480, 640, 3)
    refused = subprocess.run(
        [BIN / "internvl-infer", "--model-dir", tiny_model, "--ground", "a", "-q", "b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "not allowed with argument" in refused.stderr
    two = subprocess.run(
        [BIN / "internvl-infer", "--model-dir", tiny_model, "--ground", "a"]
        + ["-i", photo, photo, "--draw", tmp_path / "x.png"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert two.returncode == 2 and "--draw needs exactly one image" in two.stderr
