"""The trained toy checkpoint (models/internvl-toy) through the engine: parity with transformers,
accuracy on fresh scenes through every export format, and the model card. No ROS here (the ARM64 job
runs it); tests/test_toy_node.py asks the node over DDS."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOY, needs_torch
from test_parity import assert_matches_reference

from internvl_engine import Engine, Request
from internvl_toy.evaluate import accuracy, table_rows
from internvl_toy.scenes import (
    COLORS,
    GROUNDING_TASKS,
    TASKS,
    VIDEO_TASKS,
    Shape,
    moving_clip,
    render,
    samples,
)

CARD = json.loads((TOY / "accuracy.json").read_text())
RED_CIRCLE = render([Shape("circle", "red", 0.5, 0.5, 0.25)], 320, 240)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def toy_engine(toy_model):
    return Engine(toy_model)


@pytest.fixture(scope="module")
def fresh(request) -> int:
    """Questions per type on fresh scenes (--toy-questions; the card used 200)."""
    return request.config.getoption("--toy-questions")


def test_parity_with_transformers(toy_engine):
    needs_torch()
    from internvl_engine.tools.reference import load_reference

    reference = load_reference(TOY, toy_engine.tokenizer.ids["<IMG_CONTEXT>"])
    assert_matches_reference(
        toy_engine, reference, Request("What color is the shape?", images=[RED_CIRCLE])
    )
    clip = moving_clip("square", "blue", "left")
    assert_matches_reference(
        toy_engine, reference, Request("Which way does the square move?", video_frames=clip)
    )


def test_a_grown_decoder_answers_as_before(toy_engine, tmp_path):
    """internvl-train-toy --grow-decoder: the copied layers' output projections are zero, so they
    add nothing and the grown checkpoint in transformers matches the toy's engine."""
    needs_torch()
    from internvl_engine.tools.reference import load_reference
    from internvl_toy.train import grow_decoder

    layers = json.loads((TOY / "config.json").read_text())["llm_config"]["num_hidden_layers"]
    grow_decoder(TOY, tmp_path, [0, layers - 1])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["llm_config"]["num_hidden_layers"] == layers + 2
    grown = load_reference(tmp_path, toy_engine.tokenizer.ids["<IMG_CONTEXT>"])
    assert_matches_reference(
        toy_engine, grown, Request("What color is the shape?", images=[RED_CIRCLE])
    )


def test_accuracy_on_fresh_scenes(toy_engine, fresh):
    report = accuracy(toy_engine, per_task=fresh, seed=20_000)
    for task, result in report.items():
        p = CARD[task]["accuracy"]
        # a card at 100 % may still miss one
        spread = math.sqrt(min(p, 0.99) * (1 - min(p, 0.99)) / fresh)
        floor = p - 3 * spread - 0.02  # three standard errors below the card
        assert result["accuracy"] >= floor, (
            f"{task}: {result['accuracy']:.2f} < {floor:.2f}: {result['wrong']}"
        )


@pytest.fixture(scope="module")
def fp32_report(toy_engine, fresh) -> dict:
    return accuracy(toy_engine, per_task=fresh, seed=30_000)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_exports_answer_as_fp32_does(fp32_report, precision, tmp_path, fresh):
    """The toy's accuracy through an int8 or int4 export (int8 ViT with either) stays within a point
    of fp32's on the same fresh questions (within one answer when fewer are asked)."""
    from internvl_engine.tools.export import export

    export(TOY, tmp_path, precision=precision, log=lambda *_: None)
    quantized = accuracy(Engine(tmp_path), per_task=fresh, seed=30_000)
    overall = [
        sum(r["accuracy"] for r in report.values()) / len(report)
        for report in (fp32_report, quantized)
    ]
    one_answer = 1 / (fresh * len(quantized))
    assert abs(overall[0] - overall[1]) <= max(0.01, one_answer), {
        t: (fp32_report[t]["wrong"], quantized[t]["wrong"]) for t in quantized
    }


def test_model_card_matches_the_checkpoint():
    card = (TOY / "README.md").read_text()
    task_rows, group_rows = table_rows(CARD)
    # where, is_there, ground: 1-3 shapes; ground_rival: 2-3 shapes; which_image: 2-3 images
    assert len(task_rows) == len(TASKS) and len(group_rows) == 13
    for row in task_rows + group_rows:
        assert row in card, row
    # The issues' targets: 95 % for each picture question, 90 % for clips and for grounding (boxes
    # at IoU >= 0.5; the card gives its figure where it tells how grounding was trained).
    pictures = [t for t in TASKS if t not in (*VIDEO_TASKS, *GROUNDING_TASKS)]
    assert min(CARD[t]["accuracy"] for t in pictures) >= 0.95
    assert CARD["ground"]["accuracy"] >= 0.90
    assert f"{100 * CARD['ground']['accuracy']:.1f} %" in card.split("### Grounding")[1]
    assert min(CARD[t]["accuracy"] for t in VIDEO_TASKS) >= 0.90


@pytest.mark.parametrize(
    "tool, args, message",
    [
        # ZeroDivisionError
        (
            "internvl-eval-toy",
            [TOY, "--per-task", "0"],
            "--per-task must be >= 1 and --seed >= 0",
        ),
        # numpy's traceback
        (
            "internvl-eval-toy",
            [TOY, "--seed", "-1"],
            "--per-task must be >= 1 and --seed >= 0",
        ),
        # a ModelDirError traceback --lr nan: the encoder stage ran for minutes, then the decoder
        # stage would have stepped by NaN
        (
            "internvl-eval-toy",
            ["missing"],
            "missing: no such checkpoint directory",
        ),
        (
            "internvl-train-toy",
            ["--lr", "nan"],
            "--steps and --batch-size must be >= 1, --lr a number > 0",
        ),
        # the encoder stage ran first
        (
            "internvl-train-toy",
            ["--steps", "0"],
            "--steps and --batch-size must be >= 1",
        ),
        # torch's traceback
        (
            "internvl-train-toy",
            ["--threads", "-1"],
            "--seed, --threads and --region-steps must be >= 0",
        ),
        ("internvl-train-toy", ["--from", "missing"], "--from missing: not a checkpoint directory"),
        (
            "internvl-train-toy",
            ["--grow-decoder", "1"],
            "--grow-decoder grows a trained checkpoint: give it --from",
        ),
        # an IndexError or a checkpoint that transformers cannot load, after the copying
        (
            "internvl-train-toy",
            ["--from", TOY, "--grow-decoder", "1", "99"],
            "--grow-decoder [1, 99]: each must be a different layer of the decoder's",
        ),
        (
            "internvl-train-toy",
            ["--from", TOY, "--grow-decoder", "1", "1"],
            "--grow-decoder [1, 1]: each must be a different layer of the decoder's",
        ),
        # a KeyError or a draw by NaN weights, after the encoder stage
        *(
            (
                "internvl-train-toy",
                ["--task-weight", item],
                f"argument --task-weight: {item!r}: expected TASK=WEIGHT with TASK one of color,",
            )
            for item in ("ground", "grounding=2", "ground=0", "ground=nan", "ground=x")
        ),
    ],
)
def test_toy_tools_refuse_bad_options_before_working(tool, args, message, tmp_path):
    if tool == "internvl-train-toy":
        needs_torch()
        args = ["--out", tmp_path / "out", *args]
    run = subprocess.run(
        [str(BIN / tool), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2 and f"{tool}: error: {message}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()


def test_a_swapped_channel_order_changes_the_colour(toy_engine):
    """What the node test below relies on: red read as BGR is blue to this model."""
    ask = lambda image: toy_engine.answer(Request("What color is the shape?", images=[image])).text  # noqa: E731
    assert ask(RED_CIRCLE) == "red" and ask(RED_CIRCLE[..., ::-1].copy()) == "blue"


def test_a_rival_scene_has_another_shape_of_the_named_colour():
    """ground_rival: beside the named shape, one of the two or three has its colour (read back
    from the pixels at each shape's centre) and none has both its colour and its shape."""
    for sample in samples("ground_rival", 50, seed=1):
        color = sample.ground.split()[1]
        image = sample.images[0].astype(int)
        height, width = image.shape[:2]
        centres = [
            image[int((r[1] + r[3]) / 2 * height), int((r[0] + r[2]) / 2 * width)]
            for r in sample.regions
        ]
        of_colour = [abs(c - COLORS[color]).max() < 40 for c in centres]
        assert len(sample.regions) in (2, 3) and sum(of_colour) >= 2, sample.ground
        named = sample.ground.removeprefix("the ")
        assert sample.region_names.count(named) == 1, sample.region_names
        assert sample.answer.startswith(f"<ref>{sample.ground}</ref><box>[[")


def test_each_image_token_on_a_shape_is_labelled_with_its_box_and_name():
    """The grounding hints' targets: a token whose centre lies on a shape gets that shape's box and
    name (the named shape's are the answer's box and phrase), one off every shape gets neither."""
    needs_torch()
    from internvl_toy.train import REGION_NAMES, token_regions

    grid = 7
    rival = samples("ground_rival", 20, seed=2)
    regions, names = token_regions(rival, grid)
    on_shape = ~regions.isnan().any(dim=1)
    assert ((names != -100) == on_shape).all() and 0 < on_shape.float().mean() < 0.6
    for k, sample in enumerate(rival):
        height, width = sample.images[0].shape[:2]
        box = [v / n for v, n in zip(sample.box, (width, height, width, height))]
        rows = slice(k * grid * grid, (k + 1) * grid * grid)
        on_named = (regions[rows] - regions.new_tensor(box)).abs().max(dim=1).values < 1e-6
        named = REGION_NAMES.index(sample.ground.removeprefix("the "))
        assert (names[rows][on_named] == named).all(), sample.ground
        assert on_named.any(), sample.ground  # shapes are wider than a token's 1/7


def test_a_few_steps_with_the_encoder_trained_write_a_checkpoint(tmp_path):
    """Three steps of the decoder stage with the encoder trained (--vision-lr, so the name hint is
    on), from the toy: the losses are finite and the weights written have moved."""
    needs_torch()
    from internvl_toy.train import train

    log = train(tmp_path, 3, 8, 1e-4, seed=0, start=TOY, vision_lr=1e-4, log=lambda *_: None)
    assert log["vision_lr"] == 1e-4 and (tmp_path / "model.safetensors").is_file()
    (last,) = log["history"]
    assert 0 < last["hint_loss"] < 20 and math.isfinite(last["loss"])
    assert (tmp_path / "model.safetensors").read_bytes() != (TOY / "model.safetensors").read_bytes()
