"""The console scripts on the board stand-in, as a board user runs them: internvl-infer (whose
--json output must stay one JSON object although pyaxengine prints on stdout) and internvl-doctor
on a good and on broken model directories."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pulsar2
import pytest
from images import noise_image

from internvl_engine import GenerationConfig, Request
from internvl_engine.config import LayerBuild
from internvl_engine.tools.export import export

BIN = Path(sys.executable).parent


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)


def test_infer_json_is_one_object_and_the_board_engines_answer(
    board_model, tiny_hf, board_engine, tmp_path
):
    import cv2

    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), noise_image(60, 80, seed=9))
    proc = run(
        BIN / "internvl-infer",
        "--hf_model",
        tiny_hf,
        "--axmodel_path",
        board_model,
        "-q",
        "What is it?",
        "-i",
        image,
        "--max-new-tokens",
        "6",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # fails if pyaxengine's [INFO] lines reach stdout
    from internvl_engine import load_image

    expected = board_engine.answer(
        Request("What is it?", images=[load_image(image)]), GenerationConfig(max_new_tokens=6)
    )
    assert result["token_ids"] == expected.token_ids


def doctor(*args) -> tuple[int, list[str]]:
    proc = run(BIN / "internvl-doctor", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout.splitlines()


def test_doctor_passes_a_good_directory(board_model, tiny_hf):
    code, lines = doctor("--hf_model", tiny_hf, "--axmodel_path", board_model)
    assert code == 0, "\n".join(lines)
    assert lines[-1].startswith("all ") and lines[-1].endswith(" checks passed")
    assert all(line.startswith("ok ") for line in lines[:-1])
    text = "\n".join(lines)
    for expected in (
        "AXCLRTExecutionProvider",
        "axengine (AxEngineExecutionProvider)",
        "decode against 2559 cached rows; prefill chunks of 128 tokens after 0, 128",
        "K_cache bfloat16",
        "indices uint32",
        "KV cache kept in the backend's buffers",
        "ViT run:",
        "one decode step:",
        "logits finite",
    ):
        assert expected in text, expected


def broken_copy(board_model: Path, tmp_path: Path, what: str) -> Path:
    copy = Path(shutil.copytree(board_model, tmp_path / "axmodel"))
    if what == "missing layer":
        (copy / "qwen2_p128_l1_together.axmodel").unlink()
    elif what == "corrupt layer":
        (copy / "qwen2_p128_l1_together.axmodel").write_bytes(b"\x00garbage" * 64)
    elif what == "short embeddings":
        table = copy / "model.embed_tokens.weight.bfloat16.bin"
        table.write_bytes(table.read_bytes()[:-128])
    return copy


@pytest.mark.parametrize(
    "what, problem",
    [
        (
            "missing layer",
            "PROBLEM  model directory: .*layer files for layers \\[0\\], the model has 2",
        ),
        (
            "corrupt layer",
            "PROBLEM  cannot run the models: axengine cannot load .*qwen2_p128_l1_together.axmodel",
        ),
        ("short embeddings", "PROBLEM  model directory: .*embedding table has shape"),
    ],
)
def test_doctor_names_each_problem_in_one_line(board_model, tiny_hf, tmp_path, what, problem):
    import re

    code, lines = doctor(
        "--hf_model", tiny_hf, "--axmodel_path", broken_copy(board_model, tmp_path, what)
    )
    assert code == 1
    problems = [line for line in lines if line.startswith("PROBLEM")]
    assert len(problems) == 1 and re.match(problem, problems[0]) and " -> " in problems[0], (
        "\n".join(lines)
    )
    assert lines[-1] == f"1 problem(s) in {len(lines) - 1} checks"


def test_doctor_finds_layers_of_another_build_and_another_checkpoint(
    board_model, tiny_hf, contract_model, tmp_path
):
    mixed = Path(shutil.copytree(board_model, tmp_path / "mixed"))
    other = tmp_path / "other_build"
    export(
        tiny_hf,
        other,
        LayerBuild(prefill_chunk=128, kv_cache_len=2559, max_prompt_tokens=512),
        contract="axmodel",
        log=lambda *_: None,
    )
    layer = json.loads((other / "manifest.json").read_text())["files"]["layers"][1]
    pulsar2.write_model(
        mixed / "qwen2_p128_l1_together.axmodel", [other / g for g in layer], "bf16", "bf16"
    )
    code, lines = doctor("--hf_model", tiny_hf, "--axmodel_path", mixed)
    assert code == 1 and any(
        "PROBLEM  layers [1] have other shape groups than layer 0" in line for line in lines
    ), lines
    wrong_config = Path(shutil.copytree(tiny_hf, tmp_path / "hf"))
    config = json.loads((wrong_config / "config.json").read_text())
    # a checkpoint of another model beside these layers
    config["llm_config"]["num_key_value_heads"] = 4
    (wrong_config / "config.json").write_text(json.dumps(config))
    code, lines = doctor("--hf_model", wrong_config, "--axmodel_path", board_model)
    text = "\n".join(lines)
    problem = (
        "PROBLEM  model directory: the layer models' K_cache has 32 columns, config.json says 64"
    )
    assert code == 1 and problem in text, text


def test_doctor_without_pyaxengine_says_what_to_install(board_model, tiny_hf):
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("LD_LIBRARY_PATH",)}
    proc = subprocess.run(
        [
            str(BIN / "internvl-doctor"),
            "--hf_model",
            str(tiny_hf),
            "--axmodel_path",
            str(board_model),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout.startswith(
        "PROBLEM  the axengine backend needs pyaxengine"
    ), proc.stdout


def test_serve_answers_from_the_npu_path(board_model, tiny_hf, board_engine, tmp_path):
    """internvl-serve on the board: the axengine path behind the OpenAI API, as axllm serve."""
    openai = pytest.importorskip("openai", reason="needs openai (requirements/board.txt)")
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "internvl-serve"),
            *("--hf_model", str(tiny_hf), "--axmodel_path", str(board_model), "--port", "0"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r"listening on (http://\S+)", read(tmp_path / "serve.log"))):
            assert proc.poll() is None and time.monotonic() < deadline, read(tmp_path / "serve.log")
            time.sleep(0.1)
        assert "axengine" in found.string
        client = openai.OpenAI(base_url=found.group(1), api_key="none", max_retries=0)
        answer = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "What is it?"}], max_tokens=6
        )
        expected = board_engine.answer(Request("What is it?"), GenerationConfig(max_new_tokens=6))
        assert answer.choices[0].message.content == expected.text
        assert answer.usage.completion_tokens == len(expected.token_ids)
    finally:
        proc.terminate()
        proc.wait(30)


def read(path: Path) -> str:
    return path.read_text()
