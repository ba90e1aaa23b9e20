"""internvl-export --precision int8 and its fidelity report against the fp32 export."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from internvl_engine import Engine, GenerationConfig, Request
from internvl_engine.config import Manifest
from internvl_engine.export import export


@pytest.fixture(scope="module")
def int8_model(tiny_hf, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    export(tiny_hf, out, Manifest.read(tiny_model).build, precision="int8", log=lambda *_: None)
    return out


def test_int8_export_quantizes_every_weight_matmul(int8_model, tiny_model):
    assert Manifest.read(int8_model).source["precision"] == "int8"
    for name in ("layer_0.onnx", "post.onnx", "vit.onnx"):
        graph = onnx.load(str(int8_model / name)).graph
        weights = {t.name for t in graph.initializer}
        float_weight_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        assert float_weight_matmuls == [] and any(n.op_type == "MatMulInteger" for n in graph.node), name
        assert (int8_model / name).stat().st_size < (tiny_model / name).stat().st_size
    assert not list(int8_model.glob("*.fp32.onnx"))  # the intermediate fp32 files are gone
    answer = Engine(int8_model).answer(Request("What is in front of me?"), GenerationConfig(max_new_tokens=4))
    assert answer.token_ids


def test_fidelity_report(int8_model, tiny_model):
    run = subprocess.run([sys.executable, "-m", "internvl_engine.fidelity", "--reference", str(tiny_model),
                          "--candidate", str(int8_model), "--new-tokens", "6", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert [r["prompt"] for r in report["prompts"]] == ["text", "text-long", "1 image", "4 images", "video"]
    overall = report["overall"]
    assert overall["steps"] == 5 * 6 and 0 <= overall["greedy_agreement"] <= 1
    assert overall["cosine_mean"] > 0.99  # int8 weights keep the logits close
    same = subprocess.run([sys.executable, "-m", "internvl_engine.fidelity", "--reference", str(tiny_model),
                           "--candidate", str(tiny_model), "--new-tokens", "4", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert json.loads(same.stdout)["overall"]["greedy_agreement"] == 1.0  # a model follows itself exactly
