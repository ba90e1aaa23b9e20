"""The console scripts as a user runs them: internvl-make-tiny, internvl-export, internvl-infer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from conftest import first_decoder_file, with_manifest
from images import noise_image, numbered_frames, write_video

BIN = Path(sys.executable).parent


def run(*args, check=True):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_make_tiny_then_export_then_infer(tmp_path):
    run(BIN / "internvl-make-tiny", "--out", tmp_path / "hf", "--seed", "3")
    assert (
        json.loads((tmp_path / "hf" / "config.json").read_text())["llm_config"]["model_type"]
        == "qwen2"
    )
    run(BIN / "internvl-export", "--hf-model", tmp_path / "hf", "--out", tmp_path / "onnx")
    image = tmp_path / "noise.png"
    cv2.imwrite(str(image), noise_image(60, 80))
    out = run(
        BIN / "internvl-infer",
        "--model-dir",
        tmp_path / "onnx",
        "-q",
        "What is it?",
        "-i",
        image,
        "--max-new-tokens",
        "5",
    ).stdout
    assert out.startswith("answer >> ")
    assert (
        "| Image num | ImageEncoder ms | Prefill TTFT ms (tokens) | Decoder ms/token | tokens/s |"
        in out
    )
    assert "\n| 1 | " in out


def test_json_is_exactly_one_object_and_matches_the_engine(tiny_model, engine, tmp_path):
    from internvl_engine import GenerationConfig, Request, load_image

    image = tmp_path / "img.png"
    cv2.imwrite(str(image), noise_image(50, 70, seed=5))
    proc = run(
        BIN / "internvl-infer",
        "--model_dir",
        tiny_model,
        "--question",
        "Colour?",
        "--images",
        image,
        "--max_new_tokens",
        "7",
        "--json",
    )
    result = json.loads(proc.stdout)  # one object and nothing else on stdout
    # a free answer's boxes (none from the tiny model's noise, or what it wrote; see test_grounding)
    assert set(result) == {
        "text",
        "prompt_token_ids",
        "token_ids",
        "timings",
        "boxes",
        "box_problems",
    }
    assert {
        "vit_ms",
        "prefill_tokens",
        "ttft_ms",
        "decode_ms_per_token",
        "decode_tokens_per_s",
    } <= set(result["timings"])
    expected = engine.answer(
        Request("Colour?", images=[load_image(image)]), GenerationConfig(max_new_tokens=7)
    )
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    assert result["prompt_token_ids"] == expected.prompt_token_ids


def test_seed_layout_flags_with_separate_tokenizer_and_vit(tiny_hf, tiny_model, tmp_path):
    """The seed's split: layers in --axmodel_path, tokenizer from --hf_model, ViT from
    --vit_model."""
    layers = tmp_path / "layers"
    layers.mkdir()
    for p in tiny_model.iterdir():
        if p.suffix in (".onnx", ".npy") and p.name != "vit.onnx" or p.name == "manifest.json":
            (layers / p.name).write_bytes(p.read_bytes())
    vit = tmp_path / "vit_elsewhere.onnx"
    vit.write_bytes((tiny_model / "vit.onnx").read_bytes())
    image = tmp_path / "img.png"
    cv2.imwrite(str(image), noise_image(40, 40))
    common = ["-q", "What?", "-i", str(image), "--max-new-tokens", "4", "--json"]
    split = json.loads(
        run(
            BIN / "internvl-infer",
            "--hf_model",
            tiny_hf,
            "--axmodel_path",
            layers,
            "--vit_model",
            vit,
            *common,
        ).stdout
    )
    whole = json.loads(run(BIN / "internvl-infer", "--model-dir", tiny_model, *common).stdout)
    assert (
        split["token_ids"] == whole["token_ids"]
        and split["prompt_token_ids"] == whole["prompt_token_ids"]
    )
    missing = run(
        BIN / "internvl-infer",
        "--axmodel_path",
        layers,
        "--hf_model",
        tiny_hf,
        *common,
        check=False,
    )
    assert (
        missing.returncode == 2
        and "missing model files" in missing.stderr
        and "vit.onnx" in missing.stderr
    )


def test_seed_flags_and_video(tiny_model, tmp_path):
    video = write_video(tmp_path / "clip.avi", numbered_frames(20))
    proc = run(
        BIN / "internvl-infer",
        "--axmodel_path",
        tiny_model,
        "-q",
        "What moves?",
        "-v",
        video,
        "--segments",
        "4",
        "--max-new-tokens",
        "3",
        "--json",
    )
    assert len(json.loads(proc.stdout)["timings"]["vit_ms"]) == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-dir", "{tmp}/nowhere", "-q", "hi"], "no such model directory"),
        (["--model-dir", "{model}", "-q", "  "], "the question is empty"),
        (["--model-dir", "{model}", "-q", "hi", "-i", "{tmp}/bad.jpg"], "not a readable image"),
        (["--model-dir", "{model}", "-q", "hi", "-v", "{tmp}/empty.avi"], "video"),
        # no FFmpeg noise
        (
            ["--model-dir", "{model}", "-q", "hi", "-v", "{tmp}/garbage.mp4"],
            "cannot open video",
        ),
        (["--model-dir", "{model}", "-q", "~" * 1300], "accepts at most"),
        (
            ["--model-dir", "{model}", "-q", "hi", "--threads", "-1"],
            "threads must be an integer >= 0",
        ),
    ],
)
def test_bad_input_gives_one_line_error_and_nonzero_exit(tiny_model, tmp_path, args, message):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    cv2.VideoWriter(
        str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48)
    ).release()
    argv = [a.format(tmp=tmp_path, model=tiny_model) for a in args]
    proc = run(BIN / "internvl-infer", *argv, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("internvl-infer: error: ") and message in lines[0]
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prefill-chunk", "0"], "build.prefill_chunk must be an integer >= 1, not 0"),
        (
            ["--contract", "axmodel", "--prefill-chunk", "0"],
            "build.prefill_chunk must be an integer >= 1, not 0",
        ),
        (
            ["--max-prompt-tokens", "3000"],
            "build.max_prompt_tokens (3000) exceeds the KV cache (build.kv_cache_len 2559)",
        ),
        (
            ["--block-size", "32"],
            "block sizes are for int8 and int4 weights: fp32 has no blocks (give --precision)",
        ),
        # 0 read as "not given": it exported with the default (int4) or silently ignored it (fp32)
        (
            ["--precision", "int4", "--gate-up-block-size", "0"],
            "gate/up block size 0 must be a power of 2, at least 16",
        ),
        (
            ["--gate-up-block-size", "0"],
            "block sizes are for int8 and int4 weights: fp32 has no blocks (give --precision)",
        ),
    ],
)
def test_export_refuses_bad_options_with_one_line(tiny_hf, tmp_path, args, message):
    proc = run(
        BIN / "internvl-export",
        "--hf-model",
        tiny_hf,
        "--out",
        tmp_path / "out",
        *args,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (2, f"internvl-export: error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_is_one_line_not_a_traceback(tiny_hf, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out"
    for tool, args in [("internvl-make-tiny", []), ("internvl-export", ["--hf-model", tiny_hf])]:
        proc = run(BIN / tool, *args, "--out", out, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert (
            proc.stderr.startswith(f"{tool}: error: cannot write the ") and str(out) in proc.stderr
        )


def test_a_negative_seed_is_refused_with_one_line(tiny_model, tmp_path):
    for tool, args in [
        ("internvl-make-tiny", ["--out", tmp_path / "hf"]),  # numpy's traceback, --out left behind
        ("internvl-infer", ["--model-dir", tiny_model, "-q", "What?", "--temperature", "1"]),
    ]:
        proc = run(BIN / tool, *args, "--seed", "-1", check=False)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert last.startswith(f"{tool}: error: ") and last.endswith("seed must be >= 0"), (
            proc.stderr
        )
    assert not (tmp_path / "hf").exists()


def test_segments_below_one_is_a_usage_error(tiny_model, tmp_path):
    video = write_video(tmp_path / "clip.avi", numbered_frames(10))
    proc = run(
        BIN / "internvl-infer",
        "--model-dir",
        tiny_model,
        "-q",
        "What?",
        "-v",
        video,
        "--segments",
        "0",
        check=False,
    )
    assert (
        proc.returncode == 2
        and "--segments must be >= 1" in proc.stderr
        and "no frames" not in proc.stderr
    )


def test_doctor_on_a_cpu_export(tiny_model, tmp_path):
    proc = run(BIN / "internvl-doctor", "--model-dir", tiny_model)
    assert proc.stdout.splitlines()[-1].startswith("all ") and "backend onnxruntime" in proc.stdout
    broken = tmp_path / "broken"
    broken.mkdir()
    decoder = first_decoder_file(tiny_model)
    for p in tiny_model.iterdir():
        if p.name != decoder:
            (broken / p.name).write_bytes(p.read_bytes())
    proc = run(BIN / "internvl-doctor", "--model-dir", broken, check=False)
    assert (
        proc.returncode == 1
        and "PROBLEM  model directory: " in proc.stdout
        and decoder in proc.stdout
    )
    (broken / decoder).write_bytes((tiny_model / decoder).read_bytes()[:5000])  # a copy cut short
    proc = run(BIN / "internvl-doctor", "--model-dir", broken, check=False)
    assert (
        proc.returncode == 1
        and f"PROBLEM  cannot run the models: onnxruntime cannot load {broken / decoder}"
        in proc.stdout
        and proc.stdout.splitlines()[-2].endswith(
            "-> export the model again (internvl-export) with "
            "the onnxruntime that runs it (requirements/engine.txt)"
        )
    )
    # the ViT and the manifest disagree on the tokens per tile: only running the ViT shows it
    ratio = with_manifest(
        tiny_model, tmp_path / "ratio", "spec.downsample_ratio", lambda ratio: 2 * ratio
    )
    proc = run(BIN / "internvl-doctor", "--model-dir", ratio, check=False)
    assert proc.returncode == 1, proc.stdout
    problems = [line for line in proc.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 1 and " features per tile, the model needs " in problems[0], proc.stdout
    assert problems[0].endswith("-> export the ViT again from this checkpoint (internvl-export)"), (
        problems[0]
    )
