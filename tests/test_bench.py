"""internvl-bench on the tiny checkpoint: the shape of its output (figures are not asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import needs_torch

FIGURES = {"vit_ms", "ttft_ms", "prefill_tokens", "decode_ms_per_token", "tokens_per_s"}
ENGINE_FIGURES = FIGURES | {"host_overhead_ms", "host_overhead_pct", "bytes_per_token", "second_question_ttft_ms",
                            "second_question_ttft_no_reuse_ms", "second_question_reused_tokens",
                            "second_question_tokens"}


def bench(*args):
    return subprocess.run([sys.executable, "-m", "internvl_engine.bench", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_json_has_every_figure_and_the_ratios(tiny_model, tiny_hf, tmp_path):
    needs_torch()
    plot = tmp_path / "bench.png"
    run = bench("--model-dir", tiny_model, "--hf-model", tiny_hf, "--images", 0, 2, "--decode-tokens", 3,
                "--repeats", 2, "--warmup", 1, "--compare", "transformers", "--json", "--plot", plot)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report["runtimes"]) == {"engine", "transformers"}
    for name, expected in (("engine", ENGINE_FIGURES), ("transformers", FIGURES)):
        result = report["runtimes"][name]
        assert set(result["runs"]) == set(result["summary"]) == {"0", "2"}
        assert all(len(runs) == 2 and set(runs[0]) == expected for runs in result["runs"].values())
        assert all(set(s["ttft_ms"]) == {"median", "min", "max"} for s in result["summary"].values())
        assert result["peak_rss_mb"] > 0
    # Same prompts on both sides; no images, no image-encoder time.
    for count in ("0", "2"):
        assert (report["runtimes"]["engine"]["summary"][count]["prefill_tokens"]["median"]
                == report["runtimes"]["transformers"]["summary"][count]["prefill_tokens"]["median"])
    assert report["runtimes"]["engine"]["summary"]["0"]["vit_ms"]["max"] == 0
    assert set(report["ratios"]["engine"]["2"]) == {"vit_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s"}
    engine_runs = report["runtimes"]["engine"]["runs"]["2"]
    assert all(r["second_question_reused_tokens"] > 0 for r in engine_runs)  # system prompt and images reused
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(tiny_model):
    run = bench("--model-dir", tiny_model, "--images", 1, "--decode-tokens", 2, "--repeats", 1, "--warmup", 0)
    assert run.returncode == 0, run.stderr
    assert "| Image num | ImageEncoder ms | Prefill TTFT ms (tokens) | Decoder ms/token | tokens/s |" in run.stdout
    assert "host overhead ms/step" in run.stdout and "transformers" not in run.stdout


def test_bad_arguments(tiny_model, tmp_path):
    assert bench("--model-dir", tiny_model, "--compare", "transformers").returncode == 2  # needs --hf-model
    run = bench("--model-dir", tmp_path / "missing", "--images", 0, "--repeats", 1)
    assert run.returncode == 2 and "no such model directory" in run.stderr
