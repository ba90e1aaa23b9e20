"""internvl-bench on the tiny checkpoint: the shape of its output (figures are not asserted), and
the peers its decoder comparison runs (onnxruntime-genai's model of the same checkpoint decodes the
same tokens)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from conftest import TINY_BUILD_ARGS, needs_torch

from internvl_engine.config import LayerBuild
from internvl_engine.session import thread_count
from internvl_engine.tools.bench import failure, worker_pool
from internvl_engine.tools.export import export

FIGURES = {"vit_ms", "ttft_ms", "prefill_tokens", "decode_ms_per_token", "tokens_per_s"}
ENGINE_FIGURES = FIGURES | {
    "question_ttft_ms",
    "host_overhead_ms",
    "host_overhead_pct",
    "bytes_per_token",
    "second_question_ttft_ms",
    "second_question_ttft_no_reuse_ms",
    "second_question_reused_tokens",
    "second_question_tokens",
}


def bench(*args):
    return subprocess.run(
        [sys.executable, "-m", "internvl_engine.tools.bench", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_json_has_every_figure_and_the_ratios(tiny_model, tiny_hf, tmp_path):
    needs_torch()
    plot = tmp_path / "bench.png"
    run = bench(
        "--model-dir",
        tiny_model,
        "--hf-model",
        tiny_hf,
        "--images",
        0,
        2,
        "--decode-tokens",
        3,
        "--repeats",
        2,
        "--warmup",
        1,
        "--compare",
        "transformers",
        "--json",
        "--plot",
        plot,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report["runtimes"]) == {"engine", "transformers"}
    for name, expected in (("engine", ENGINE_FIGURES), ("transformers", FIGURES)):
        result = report["runtimes"][name]
        assert set(result["runs"]) == set(result["summary"]) == {"0", "2"}
        assert all(len(runs) == 2 and set(runs[0]) == expected for runs in result["runs"].values())
        assert all(
            set(s["ttft_ms"]) == {"median", "min", "max"} for s in result["summary"].values()
        )
        assert result["peak_rss_mb"] > 0
    # Same prompts on both sides; no images, no image-encoder time.
    for count in ("0", "2"):
        assert (
            report["runtimes"]["engine"]["summary"][count]["prefill_tokens"]["median"]
            == report["runtimes"]["transformers"]["summary"][count]["prefill_tokens"]["median"]
        )
    assert report["runtimes"]["engine"]["summary"]["0"]["vit_ms"]["max"] == 0
    assert set(report["ratios"]["engine"]["2"]) == {
        "vit_ms",
        "ttft_ms",
        "decode_ms_per_token",
        "tokens_per_s",
    }
    engine_runs = report["runtimes"]["engine"]["runs"]["2"]
    # pictures to first token: preprocessing, the ViT and the prefill
    assert all(r["question_ttft_ms"] > r["vit_ms"] + r["ttft_ms"] for r in engine_runs)
    # system prompt and images reused
    assert all(r["second_question_reused_tokens"] > 0 for r in engine_runs)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(tiny_model):
    run = bench(
        "--model-dir",
        tiny_model,
        "--images",
        1,
        "--decode-tokens",
        2,
        "--repeats",
        1,
        "--warmup",
        0,
    )
    assert run.returncode == 0, run.stderr
    assert (
        "| Image num | ImageEncoder ms | Prefill TTFT ms (tokens) | Decoder ms/token | tokens/s |"
        in run.stdout
    )
    assert "host overhead ms/step" in run.stdout and "transformers" not in run.stdout


def test_bad_arguments(tiny_model, tmp_path):
    # needs --hf-model
    assert bench("--model-dir", tiny_model, "--compare", "transformers").returncode == 2
    run = bench("--model-dir", tmp_path / "missing", "--images", 0, "--repeats", 1)
    assert run.returncode == 2 and "no such model directory" in run.stderr


def needs_genai():
    needs_torch()  # its builder loads the checkpoint with transformers
    pytest.importorskip(
        "onnxruntime_genai", reason="onnxruntime-genai is not installed (requirements/dev.txt)"
    )


@pytest.fixture(scope="module")
def tiny_int4(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4")
    export(tiny_hf, out, LayerBuild(**TINY_BUILD_ARGS), precision="int4", log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def peers_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("peers")


def test_decoder_comparison(tiny_model, tiny_int4, tiny_hf, peers_dir):
    needs_genai()
    run = bench(
        "--model-dir",
        tiny_model,
        tiny_int4,
        "--hf-model",
        tiny_hf,
        "--contexts",
        16,
        40,
        "--decode-tokens",
        3,
        "--repeats",
        2,
        "--warmup",
        0,
        "--compare",
        "onnxruntime-genai",
        "transformers",
        "--peers-dir",
        peers_dir,
        "--threads",
        1,
        "--json",
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    fp32, int4 = tiny_model.name, tiny_int4.name
    assert list(report["runtimes"]) == [
        fp32,
        int4,
        "onnxruntime-genai fp32",
        "onnxruntime-genai int4",
        "transformers",
    ]
    for result in report["runtimes"].values():
        assert len(result["runs"]) == 2 and set(result["summary"]) == {"16", "40"}
        assert all(set(s) == {"prefill_ms", "tokens_per_s"} for s in result["summary"].values())
        assert result["weights_bytes"] > 0 and result["peak_rss_mb"] > 0
    runtimes = report["runtimes"]
    assert [runtimes[n]["precision"] for n in runtimes] == ["fp32", "int4", "fp32", "int4", "fp32"]
    assert runtimes[int4]["weights_bytes"] < runtimes[fp32]["weights_bytes"] / 3
    assert set(report["ratios"]) == {
        f"{fp32} vs onnxruntime-genai fp32",
        f"{fp32} vs transformers",
        f"{int4} vs onnxruntime-genai int4",
    }
    assert report["bandwidth_gb_s"] > 0
    # kept for the next run without --threads every runtime gets every core: onnxruntime-genai's own
    # default took 1 of 2 here
    assert (peers_dir / "onnxruntime-genai-int4" / "genai_config.json").is_file()
    table = bench(
        "--model-dir",
        tiny_int4,
        "--hf-model",
        tiny_hf,
        "--contexts",
        16,
        "--decode-tokens",
        2,
        "--repeats",
        1,
        "--warmup",
        0,
        "--compare",
        "onnxruntime-genai",
        "--peers-dir",
        peers_dir,
    )
    assert table.returncode == 0, table.stderr
    assert (
        "| runtime | weights read per token MB | prefill 16 tokens ms | decode tok/s at 16 |"
        in table.stdout
    )
    assert f"GB/s ({thread_count(None)} threads)" in table.stdout
    genai_config = json.loads(
        (peers_dir / "onnxruntime-genai-int4" / "genai_config.json").read_text()
    )
    assert genai_config["model"]["decoder"]["session_options"][
        "intra_op_num_threads"
    ] == thread_count(None)


def test_peers_decode_what_the_engine_decodes(tiny_model, tiny_hf, peers_dir):
    """The peers run the same decoder: onnxruntime-genai's fp32 model of the checkpoint and
    transformers' Qwen2 on its language model pick the engine's greedy tokens after the same
    prompt."""
    needs_genai()
    from internvl_engine.tools.peers import (
        EngineDecoder,
        GenaiDecoder,
        TransformersDecoder,
        build_genai,
        export_qwen2,
    )

    genai = build_genai(tiny_hf, "fp32", peers_dir, 1)
    decoders = [
        EngineDecoder(str(tiny_model), 1),
        GenaiDecoder(str(genai), "fp32", 1, 64),
        TransformersDecoder(str(export_qwen2(tiny_hf, peers_dir / "qwen2")), 1),
    ]
    ids = np.random.default_rng(5).integers(0, 500, 20).tolist()
    tokens = []
    for decoder in decoders:
        token = decoder.prefill(ids)
        tokens.append([token] + [token := decoder.decode(token) for _ in range(8)])
    assert tokens[0] == tokens[1] == tokens[2]


def test_decoder_comparison_arguments(tiny_model, tmp_path):
    # needs --hf-model
    assert bench("--model-dir", tiny_model, "--compare", "onnxruntime-genai").returncode == 2
    run = bench("--model-dir", tiny_model, "--gguf", tmp_path / "q8_0.gguf")
    assert run.returncode == 2 and "--gguf times llama.cpp's decoder with --contexts" in run.stderr
    run = bench("--model-dir", tiny_model, "--contexts", 16, "--plot", tmp_path / "p.png")
    assert (
        run.returncode == 2
        and "--plot draws TTFT against image count: not with --contexts" in run.stderr
    )
    run = bench("--model-dir", tiny_model, "--contexts", 0)
    assert (
        run.returncode == 2
        and run.stderr.splitlines()[-1] == "internvl-bench: error: --contexts must be >= 1"
    )
    run = bench(
        "--model-dir",
        tiny_model,
        "--contexts",
        16,
        "--gguf",
        tmp_path / "missing.gguf",
        "--repeats",
        1,
    )
    assert run.returncode == 2 and "missing.gguf" in run.stderr
    # over the build's limit
    run = bench("--model-dir", tiny_model, "--contexts", 2000, "--repeats", 1)
    assert run.returncode == 2 and "needs an export with --max-prompt-tokens 2000" in run.stderr
    # was a numpy traceback
    run = bench("--model-dir", tiny_model, "--contexts", 16, "--threads", -1)
    assert run.returncode == 2 and "--threads >= 0" in run.stderr and "Traceback" not in run.stderr


def test_a_runtime_that_crashes_is_named_with_the_stack_it_died_in(capfd):
    """A peer's native crash (here a real one: reading address 0) kills its child process without a
    Python exception. The bench says the process died, and faulthandler has printed where."""
    with worker_pool() as pool:
        with pytest.raises(BrokenProcessPool) as e:
            pool.submit(ctypes.string_at, 0).result(timeout=60)
    assert failure(e.value).startswith("its process died (a crash in native code, its stack above")
    stderr = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in stderr and "string_at" in stderr, stderr


def needs_openvino():
    from internvl_engine.tools.peer_vit import openvino_missing

    if why := openvino_missing():
        pytest.skip(why)


def test_openvino_runs_the_same_vit(tiny_hf, tiny_model):
    """The ViT OpenVINO is timed on computes what the engine's fp32 ViT computes (the comparison is
    of one function of one checkpoint's weights), and NNCF's int8 of it follows it closely."""
    needs_openvino()
    from internvl_engine import Engine, Request
    from internvl_engine.tools.fidelity import cosine
    from internvl_engine.tools.peer_vit import OpenVinoVit, one_tile_each

    image = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    engine = Engine(tiny_model)
    tile = engine.prepare(Request("Describe.", images=[image])).pixel_values[:1]
    expected = engine.vit.run({"image": tile})[0]
    fp32 = OpenVinoVit(tiny_hf, "fp32", 1, [])
    np.testing.assert_allclose(fp32.run(tile), expected, rtol=1e-3, atol=1e-3)
    pictures = [
        np.random.default_rng(50 + i).integers(0, 256, image.shape, np.uint8) for i in (0, 1)
    ]
    size = tile.shape[-1]
    int8 = OpenVinoVit(tiny_hf, "int8", 1, one_tile_each(pictures, size))
    assert int8.label.endswith("int8 (NNCF)") and int8.quantize_s > 0
    assert cosine(int8.run(tile).reshape(-1), expected.reshape(-1)) > 0.99


def test_openvino_comparison_table(tiny_hf, tiny_model):
    needs_openvino()
    run = bench(
        "--model-dir", tiny_model, "--hf-model", tiny_hf, "--images", 1, "--decode-tokens", 2,
        "--repeats", 2, "--warmup", 1, "--compare", "openvino", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report["runtimes"]) == {"engine", "openvino fp32", "openvino int8"}
    for name in ("openvino fp32", "openvino int8"):
        runs = report["runtimes"][name]["runs"]["1"]
        assert len(runs) == 2 and all(set(r) == {"vit_ms"} and r["vit_ms"] > 0 for r in runs)
    assert "NNCF" in report["runtimes"]["openvino int8"]["backend"]
    assert set(report["vit_ratios"]["engine"]["1"]) == {"openvino fp32", "openvino int8"}
    assert "ratios" not in report  # no transformers side
    table = bench(
        "--model-dir", tiny_model, "--hf-model", tiny_hf, "--images", 1, "--repeats", 1,
        "--warmup", 0, "--decode-tokens", 1, "--compare", "openvino",
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "ratio engine vs its peers, image encoder" in table.stdout
    assert "| Image num | engine ms | openvino fp32 | openvino int8 |" in table.stdout
    refused = bench(
        "--model-dir", tiny_model, "--hf-model", tiny_hf, "--contexts", 16, "--compare", "openvino"
    )  # fmt: skip
    assert refused.returncode == 2 and "times the image path: not with --contexts" in refused.stderr


def test_openvino_comparison_without_openvino(tiny_hf, tiny_model, tmp_path):
    """Where OpenVINO is not installed (a package that fails to import stands for it), the bench
    says so and how to install it, before timing anything."""
    absent = tmp_path / "site" / "openvino"
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'openvino'\", name='openvino')\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "internvl_engine.tools.bench", "--model-dir", str(tiny_model)]
        + ["--hf-model", str(tiny_hf), "--images", "1", "--compare", "openvino"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(absent.parent)},
    )
    assert run.returncode == 2
    assert "--compare openvino: openvino is not installed (pip install -r " in run.stderr
    assert "requirements/peers-image.txt" in run.stderr and "done" not in run.stderr


def test_llama_cpp_comparison_arguments(tiny_hf, tiny_model, tmp_path):
    """The image path's llama.cpp side wants one decoder GGUF and the vision GGUFs, not with
    --contexts, each file there; where llama-cpp-python is absent (a package that fails to import
    stands for it) the bench says how to install it, before timing anything."""
    gguf, mmproj = tmp_path / "qwen2-q8_0.gguf", tmp_path / "mmproj-f16.gguf"
    gguf.write_bytes(b"GGUF")
    mmproj.write_bytes(b"GGUF")
    image_path = ("--model-dir", tiny_model, "--hf-model", tiny_hf, "--compare", "llama.cpp")
    for extra, error in (
        (("--gguf", gguf), "needs one --gguf (the decoder) and --mmproj files"),
        (("--mmproj", mmproj), "needs one --gguf (the decoder) and --mmproj files"),
        (("--gguf", gguf, gguf, "--mmproj", mmproj), "needs one --gguf"),
        (("--gguf", gguf, "--mmproj", tmp_path / "gone.gguf"), "gone.gguf: no such GGUF file"),
        (("--gguf", gguf, "--mmproj", mmproj, "--contexts", 16), "times the image path"),
    ):
        run = bench(*image_path, *extra)
        assert run.returncode == 2 and error in run.stderr, (extra, run.stderr)
    run = bench("--model-dir", tiny_model, "--contexts", 16, "--mmproj", mmproj)
    assert run.returncode == 2 and "--mmproj is llama.cpp's image path" in run.stderr
    run = bench("--model-dir", tiny_model, "--images", 1, "--mmproj", mmproj)
    assert run.returncode == 2 and "with --compare llama.cpp and --mmproj" in run.stderr
    absent = tmp_path / "site" / "llama_cpp"
    absent.mkdir(parents=True)
    (absent / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'llama_cpp'\", name='llama_cpp')\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "internvl_engine.tools.bench"]
        + [str(a) for a in (*image_path, "--gguf", gguf, "--mmproj", mmproj)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(absent.parent)},
    )
    assert run.returncode == 2, run.stderr
    assert "--compare llama.cpp: llama_cpp is not installed (pip install " in run.stderr
    assert "done" not in run.stderr
