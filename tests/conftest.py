"""Shared fixtures. Every test process keeps DDS on loopback and gets its own ROS domain."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (images.py, ros_harness.py)

TEST_CHUNK = 16  # small prefill chunks so short prompts span several chunks
TOY = Path(__file__).resolve().parent.parent / "models" / "internvl-toy"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    from internvl_engine.tools.make_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_hf"), seed=0)


def first_decoder_file(model_dir: Path) -> str:
    """The fused layout's decoder.onnx, or the per-layer layout's first layer."""
    from internvl_engine.config import ModelLayout

    layout = ModelLayout.find(model_dir)
    return (layout.decoder or layout.layer_files()[0]).name


def update_field(tree: dict, path: str, change) -> None:
    """``tree["a"]["b"] = change(tree["a"]["b"])`` for the path ``"a.b"``."""
    *parents, key = path.split(".")
    for name in parents:
        tree = tree[name]
    tree[key] = change(tree[key])


def with_manifest(model_dir: Path, out: Path, path: str, change) -> Path:
    """``model_dir`` again at ``out`` (its files linked) with the manifest field ``path`` edited by
    ``change``, as a user editing the file by hand would."""
    out.mkdir()
    for p in model_dir.iterdir():
        if p.name != "manifest.json":
            (out / p.name).symlink_to(p)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    update_field(manifest, path, change)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def pytest_addoption(parser):
    parser.addoption(
        "--toy-questions",
        type=int,
        default=60,
        metavar="N",
        help="fresh questions per type in the toy model's accuracy tests (default 60; the ARM64 "
        "job, "
        "emulated, asks fewer)",
    )
    parser.addoption(
        "--board-select",
        default="",
        metavar="EXPRESSION",
        help="only the board stand-in tests (tests/axboard) this -k expression selects, for each "
        "pyaxengine version (default: all; the ARM64 job, emulated, runs fewer)",
    )


TINY_BUILD_ARGS = dict(prefill_chunk=TEST_CHUNK, kv_cache_len=1279, max_prompt_tokens=1152)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf, tmp_path_factory) -> Path:
    from internvl_engine.config import LayerBuild
    from internvl_engine.tools.export import export

    out = tmp_path_factory.mktemp("tiny_onnx")
    export(tiny_hf, out, LayerBuild(**TINY_BUILD_ARGS), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def endless_model(tmp_path_factory) -> Path:
    """The tiny model whose answers never end by themselves: the lm_head rows of its stop tokens are
    the mean of the other rows, so their logit is below the largest one at every step and greedy
    answers run to max_new_tokens (up to 4096 here, 0.6 s alone). Cancel tests then do not race the
    answer's natural end (the plain tiny model stops after ~1,300 tokens, 0.15 s)."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from internvl_engine.config import LayerBuild
    from internvl_engine.models import qwen2
    from internvl_engine.prompt import Tokenizer
    from internvl_engine.tools.export import export
    from internvl_engine.tools.make_tiny import make_tiny

    hf = make_tiny(tmp_path_factory.mktemp("endless_hf"), seed=0)
    tensors = load_file(str(hf / "model.safetensors"))
    head = tensors[qwen2.LM_HEAD].astype(np.float32)
    stops = sorted(Tokenizer(hf).stop_ids)
    others = np.setdiff1d(np.arange(head.shape[0]), stops)
    head[stops] = head[others].mean(axis=0)
    tensors[qwen2.LM_HEAD] = head.astype(ml_dtypes.bfloat16)
    save_file(tensors, str(hf / "model.safetensors"))
    out = tmp_path_factory.mktemp("endless_onnx")
    build = LayerBuild(prefill_chunk=TEST_CHUNK, kv_cache_len=8191)
    export(hf, out, build, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def contract_model(tiny_hf, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to the AX650N contract (one model per Pulsar2 shape group) with
    the seed's llm_build (LayerBuild's defaults)."""
    from internvl_engine.config import LayerBuild
    from internvl_engine.tools.export import export

    out = tmp_path_factory.mktemp("contract")
    export(tiny_hf, out, LayerBuild(), contract="axmodel", log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def tiny_layers_model(tiny_hf, tmp_path_factory) -> Path:
    """The same checkpoint as per-layer models (the AX650N contract with dynamic shapes)."""
    from internvl_engine.config import LayerBuild
    from internvl_engine.tools.export import export

    out = tmp_path_factory.mktemp("tiny_layers")
    export(tiny_hf, out, LayerBuild(**TINY_BUILD_ARGS), contract="dynamic", log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def layers_engine(tiny_layers_model):
    from internvl_engine import Engine

    return Engine(tiny_layers_model)


@pytest.fixture(scope="session")
def engine(tiny_model):
    from internvl_engine import Engine

    return Engine(tiny_model)


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    """The trained toy checkpoint (models/internvl-toy), exported."""
    from internvl_engine.tools.export import export

    out = tmp_path_factory.mktemp("toy_onnx")
    export(TOY, out, log=lambda *_: None)
    return out


def needs_torch():
    """Skip a test that needs torch and transformers (requirements/dev.txt), where they are missing
    (a board)."""
    pytest.importorskip(
        "torch",
        reason="needs torch (requirements/dev.txt): transformers' InternVL is the reference",
    )
    pytest.importorskip("transformers", reason="needs transformers (requirements/dev.txt)")


@pytest.fixture(scope="session")
def reference(tiny_hf, engine):
    needs_torch()
    from internvl_engine.tools.reference import load_reference

    return load_reference(tiny_hf, engine.tokenizer.ids["<IMG_CONTEXT>"])


# tests/launch holds launch_testing files, run by tests/test_launch.py with the launch_test command;
# tests/axboard runs only under tests/test_board.py, once per pyaxengine version over the board
# stand-in.
collect_ignore = ["launch"] + ([] if os.environ.get("AXSTANDIN_VERSION") else ["axboard"])
