"""The trained toy checkpoint compiled for the board stand-in: through pyaxengine, bf16 on the
"NPU", it gives the same greedy answers as the onnxruntime fixed-shape path, and they are right."""

from __future__ import annotations

from pathlib import Path

import pulsar2
import pytest

from internvl_engine import Engine, GenerationConfig
from internvl_engine.config import LayerBuild
from internvl_engine.tools.export import export
from internvl_toy.evaluate import request
from internvl_toy.scenes import TASKS, samples

TOY = Path(__file__).resolve().parents[2] / "models" / "internvl-toy"
PER_TASK = 15


@pytest.fixture(scope="module")
def toy_engines(tmp_path_factory):
    contract = tmp_path_factory.mktemp("toy_contract")
    # the seed's llm_build
    export(TOY, contract, LayerBuild(), contract="axmodel", log=lambda *_: None)
    board = pulsar2.compile_contract(contract, tmp_path_factory.mktemp("toy_axmodel"))
    return Engine(board, tokenizer_dir=TOY), Engine(contract, backend="onnxruntime")


@pytest.mark.parametrize("task", list(TASKS))
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
