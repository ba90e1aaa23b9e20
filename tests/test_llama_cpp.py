"""llama.cpp's multimodal path (libmtmd through llama-cpp-python) beside the engine's image path,
as ``internvl-bench --compare llama.cpp`` times it: llama.cpp's own converter writes the tiny
checkpoint's decoder and vision GGUFs (scripts/make_gguf.py --mmproj), and its vision encoder must
compute the engine's features of the same tile, its prompt the engine's prompt.

Not quite the same features: llama.cpp 0.3.36's InternVL graph (tools/mtmd/models/internvl.cpp)
puts the class token after the patches but adds the position embeddings in the checkpoint's order,
whose first row is the class token's, so every patch gets its neighbour's position (the pattern of
llama.cpp issue 25814, there for LLaVA). Its features are the engine's for the checkpoint with its
position embeddings moved one row on; the work, and so the time, is the same.

llama-cpp-python compiles llama.cpp: ``make test-llama-cpp`` builds it once (build/llama-cpp), sets
INTERNVL_LLAMA_CPP_SOURCE to the llama.cpp tree its converter comes from and runs these; elsewhere
they skip and say so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BUILD_ARGS
from test_bench import bench

from internvl_engine import Engine, Request
from internvl_engine.engine import argmax, generate_step
from internvl_engine.tools.bench import QUESTION
from internvl_engine.tools.fidelity import cosine
from internvl_engine.tools.peer_vit import llama_cpp_missing

LLAMA_CPP_SOURCE = os.environ.get("INTERNVL_LLAMA_CPP_SOURCE", "")
pytestmark = pytest.mark.skipif(
    not LLAMA_CPP_SOURCE or bool(llama_cpp_missing()),
    reason="needs llama-cpp-python and llama.cpp's converter: make test-llama-cpp builds them "
    "(build/llama-cpp) and runs these",
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ggufs(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_gguf.py"), "--hf-model", str(tiny_hf)]
        + ["--llama-cpp", LLAMA_CPP_SOURCE, "--out", str(out), "--mmproj"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def shifted_model(tiny_hf, tmp_path_factory) -> Path:
    """The tiny checkpoint as llama.cpp computes it: its position embeddings one row on (patch i
    gets row i, the class token the last), exported as tiny_model is."""
    from safetensors.numpy import load_file, save_file

    from internvl_engine.config import LayerBuild
    from internvl_engine.tools.export import export

    work = tmp_path_factory.mktemp("shifted")
    checkpoint = work / "ckpt"
    shutil.copytree(tiny_hf, checkpoint)
    weights = load_file(str(tiny_hf / "model.safetensors"))
    name = "vision_model.embeddings.position_embedding"
    rows = weights[name]  # [1, 1 + patches, width]: the class token's row first
    weights[name] = np.concatenate([rows[:, -1:], rows[:, :-1]], axis=1)
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    export(checkpoint, work / "onnx", LayerBuild(**TINY_BUILD_ARGS), log=lambda *_: None)
    return work / "onnx"


@pytest.fixture(scope="module")
def picture():
    return np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)


def features(model_dir: Path, picture: np.ndarray) -> np.ndarray:
    engine = Engine(model_dir)
    prompt = engine.prepare(Request("Describe.", images=[picture]))
    return engine.vit.run({"image": prompt.pixel_values[:1]})[0][0]


@pytest.mark.parametrize(("mmproj", "least_cosine"), [("f16", 0.9999), ("q8_0", 0.999)])
def test_llama_cpp_encodes_what_the_engine_encodes(
    tiny_model, shifted_model, ggufs, picture, mmproj, least_cosine
):
    """llama.cpp's vision encoder, given the tile the engine encodes, computes the engine's fp32
    features of the checkpoint with its position embeddings shifted (the module's docstring) to
    F16's (or Q8_0's) precision: the two sides time one amount of work on one checkpoint. A
    different preprocessing, projector or pixel shuffle would be far off, as the unshifted
    checkpoint's features are: the day llama.cpp puts the class token first, this fails and the
    shift goes."""
    from internvl_engine.preprocess import tiles
    from internvl_engine.tools.peer_vit import LlamaCppMtmd

    peer = LlamaCppMtmd(ggufs / "qwen2-f32.gguf", ggufs / f"mmproj-{mmproj}.gguf", 1)
    try:
        computed = peer.encode(tiles(picture, Engine(tiny_model).spec.image_size, 1)[0])
    finally:
        peer.close()
    shifted, unshifted = features(shifted_model, picture), features(tiny_model, picture)
    assert computed.shape == shifted.shape
    assert cosine(computed.reshape(-1), shifted.reshape(-1)) >= least_cosine
    assert cosine(computed.reshape(-1), unshifted.reshape(-1)) < 0.9


def test_llama_cpp_asks_the_engine_prompt(shifted_model, ggufs, picture):
    """The question llama.cpp is timed on is the engine's: the same number of prompt tokens (its
    chat markup, ``<img>`` and ``</img>`` and the image's tokens), and with the F32 decoder and the
    F16 vision encoder, the engine's greedy first token (of the shifted checkpoint, as above)."""
    from internvl_engine.preprocess import tiles
    from internvl_engine.tools.peer_vit import LlamaCppMtmd

    engine = Engine(shifted_model)
    prompt = engine.prepare(Request(QUESTION, images=[picture]))
    first = next(generate_step(engine.llm, prompt.embeds, argmax, reuse_prefix=False)).token
    peer = LlamaCppMtmd(ggufs / "qwen2-f32.gguf", ggufs / "mmproj-f16.gguf", 1)
    try:
        asked = peer.ask(QUESTION, [tiles(picture, engine.spec.image_size, 1)[0]])
    finally:
        peer.close()
    assert asked["image_tokens"] == engine.spec.num_image_token
    assert asked["prompt_tokens"] == len(prompt.token_ids)
    assert asked["token"] == first
    assert 0 < asked["vit_s"] < asked["ttft_s"]


def test_llama_cpp_comparison_table(tiny_hf, tiny_model, ggufs):
    run = bench(
        "--model-dir", tiny_model, "--hf-model", tiny_hf, "--images", 0, 1, "--decode-tokens", 2,
        "--repeats", 2, "--warmup", 1, "--compare", "llama.cpp", "--gguf",
        ggufs / "qwen2-q8_0.gguf", "--mmproj", ggufs / "mmproj-f16.gguf",
        ggufs / "mmproj-q8_0.gguf", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    peers = {"llama.cpp mmproj-f16", "llama.cpp mmproj-q8_0"}
    assert set(report["runtimes"]) == {"engine"} | peers
    engine = report["runtimes"]["engine"]["summary"]
    for name in peers:
        result = report["runtimes"][name]
        assert "mtmd" in result["backend"]
        for count in ("0", "1"):
            runs = result["runs"][count]
            assert len(runs) == 2
            assert all(set(r) == {"vit_ms", "question_ttft_ms", "prefill_tokens"} for r in runs)
            assert all(
                r["question_ttft_ms"] > 0 and (r["vit_ms"] > 0) == (count == "1") for r in runs
            )
            # the same prompt on both sides
            assert (
                result["summary"][count]["prefill_tokens"]["median"]
                == engine[count]["prefill_tokens"]["median"]
            )
        assert result["summary"]["0"]["vit_ms"]["max"] == 0
    assert set(report["vit_ratios"]["engine"]) == {"1"}  # no image, no encoder to compare
    assert set(report["vit_ratios"]["engine"]["1"]) == peers
    assert set(report["ttft_ratios"]["engine"]) == {"0", "1"}
    assert all(r > 0 for r in report["ttft_ratios"]["engine"]["1"].values())
    table = bench(
        "--model-dir", tiny_model, "--hf-model", tiny_hf, "--images", 1, "--repeats", 1,
        "--warmup", 0, "--decode-tokens", 1, "--compare", "llama.cpp", "--gguf",
        ggufs / "qwen2-q8_0.gguf", "--mmproj", ggufs / "mmproj-q8_0.gguf",
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "| Image num | ImageEncoder ms | Question TTFT ms (tokens) |" in table.stdout
    assert "ratio engine vs its peers, image question, pictures to first token" in table.stdout
    assert "| Image num | engine ms | llama.cpp mmproj-q8_0 |" in table.stdout
