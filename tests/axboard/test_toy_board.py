"""The trained toy checkpoint compiled for the board stand-in: through pyaxengine, bf16 on the
"NPU", it gives the same greedy answers as the onnxruntime fixed-shape path, and they are right."""

from __future__ import annotations

from pathlib import Path

import pulsar2
import pytest

from internvl_engine import Engine, GenerationConfig
from internvl_engine.config import LayerBuild
from internvl_engine.grounding import iou
from internvl_engine.tools.export import export
from internvl_toy.evaluate import MIN_IOU, request
from internvl_toy.scenes import GROUNDING_TASKS, TASKS, samples

TOY = Path(__file__).resolve().parents[2] / "models" / "internvl-toy"
PER_TASK = 15


@pytest.fixture(scope="module")
def toy_engines(tmp_path_factory):
    contract = tmp_path_factory.mktemp("toy_contract")
    # the seed's llm_build
    export(TOY, contract, LayerBuild(), contract="axmodel", log=lambda *_: None)
    board = pulsar2.compile_contract(contract, tmp_path_factory.mktemp("toy_axmodel"))
    return Engine(board, tokenizer_dir=TOY), Engine(contract, backend="onnxruntime")


@pytest.mark.parametrize("task", [t for t in TASKS if t not in GROUNDING_TASKS])
def test_toy_answers_on_the_board_equal_the_cpu(toy_engines, task):
    board, cpu = toy_engines
    assert board.backend == "axengine" and board.llm.resident
    config = GenerationConfig(max_new_tokens=8)
    right = 0
    for sample in samples(task, PER_TASK, seed=30_000):
        answer = board.answer(request(sample), config).text
        assert answer == cpu.answer(request(sample), config).text, sample.question
        right += answer.strip() == sample.answer
    assert right >= PER_TASK - 1, f"{task}: {right}/{PER_TASK} right"


def test_toy_boxes_on_the_board_follow_the_cpu(toy_engines):
    """Grounding: a box is right from an IoU of 0.5 with the true one (internvl-eval-toy), not by
    its text, and bf16 on the "NPU" may write a coordinate one step of 10 away from fp32's, so the
    board's box must overlap the CPU path's closely and be right about as often (the toy's
    grounding: 97.5 %)."""
    board, cpu = toy_engines
    config = GenerationConfig(max_new_tokens=64)
    right = cpu_right = 0
    for sample in samples("ground", PER_TASK, seed=30_000):
        on_board, on_cpu = (e.answer(request(sample), config).boxes for e in (board, cpu))
        assert len(on_board) == len(on_cpu) == 1, sample.question
        assert iou(on_board[0].corners, on_cpu[0].corners) >= 0.8, sample.question
        right += iou(on_board[0].corners, sample.box) >= MIN_IOU
        cpu_right += iou(on_cpu[0].corners, sample.box) >= MIN_IOU
    assert right >= cpu_right - 1 and right >= PER_TASK - 4, (right, cpu_right)
