"""internvl-export --precision int8|int4: block-wise quantised decoder weights (MatMulNBits), in the
fused and the per-layer layouts; --prefill int8: prompts through a second graph of per-channel int8
weights (RowInt8); and internvl-fidelity's report of how closely they follow fp32."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import TINY_BUILD_ARGS

from internvl_engine import Engine, GenerationConfig, Request
from internvl_engine.backend_onnxruntime import load_session, session_options
from internvl_engine.config import LayerBuild, Manifest
from internvl_engine.cpu import int8_gemm_exact
from internvl_engine.fused import PROMPT_GRAPH_MIN_ROWS
from internvl_engine.models.internvit import GELU_MINIMUM
from internvl_engine.tools.export import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_GATE_UP_BLOCK_SIZE,
    DEFAULT_PREFILL,
    export,
)
from internvl_engine.tools.fidelity import cosine
from internvl_engine.tools.graph import (
    Graph,
    Quantization,
    RowInt8,
    quantize_blocks,
    quantize_channels,
)
from internvl_engine.tools.make_tiny import make_tiny


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_quantized_blocks_round_trip(bits, block_size):
    """Packing as MatMulNBits reads it: dequantising the packed values gives the weights back to
    within half a step of their block, and zero stays zero."""
    rng = np.random.default_rng(bits + block_size)
    weight = rng.standard_normal((24, 200)).astype(np.float32)
    weight[3, 10:50] = 0
    values, scales, zeros = quantize_blocks(weight, Quantization(bits, block_size))
    blocks = -(-200 // block_size)
    assert values.shape == (24, blocks, block_size * bits // 8) and scales.shape == (24 * blocks,)
    if bits == 4:
        q = np.stack([values & 0xF, values >> 4], -1).reshape(24, blocks, block_size)
        z = np.stack([zeros & 0xF, zeros >> 4], -1).reshape(24, -1)[:, :blocks]
    else:
        q, z = values, zeros.reshape(24, blocks)
    s = scales.reshape(24, blocks)
    restored = ((q.astype(np.float32) - z[..., None]) * s[..., None]).reshape(24, -1)[:, :200]
    assert np.all(np.abs(restored - weight) <= np.repeat(s, block_size, axis=1)[:, :200] / 2 + 1e-6)
    assert np.all(restored[3, 10:50] == 0)


def assert_block_sizes(path, spec, gate_up: int, other: int) -> None:
    """Every MatMulNBits node of a decoder file is in blocks of ``gate_up`` (the MLP's gate and up
    projections, one matrix in both layouts) or ``other``, capped at the row's width (the tiny
    model's 64-wide rows take blocks of 64 at most)."""
    gate_up_rows = spec.intermediate_size * 2
    seen = set()
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            is_gate_up = (a["K"], a["N"]) == (spec.hidden_size, gate_up_rows)
            expected = min(gate_up if is_gate_up else other, 1 << (a["K"].bit_length() - 1))
            assert a["block_size"] == expected, (path.name, a)
            seen.add(is_gate_up)
    assert seen == {True, False}, path.name


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    export(
        tiny_hf, out, LayerBuild(**TINY_BUILD_ARGS), precision=request.param, log=lambda *_: None
    )
    return request.param, out


def test_every_decoder_matmul_is_block_quantized(quantized, tiny_model):
    precision, model = quantized
    manifest = Manifest.read(model)
    assert manifest.source["precision"] == precision
    assert manifest.source["block_size"] == DEFAULT_BLOCK_SIZE[precision]
    gate_up = DEFAULT_GATE_UP_BLOCK_SIZE.get(precision, DEFAULT_BLOCK_SIZE[precision])
    assert manifest.source["gate_up_block_size"] == gate_up
    fused = "decoder" in manifest.files
    assert manifest.source["prefill"] == (DEFAULT_PREFILL[precision] if fused else "same")
    decoder = [model / "decoder.onnx"] if fused else [model / "post.onnx", model / "layer_0.onnx"]
    for path in decoder:
        graph = onnx.load(str(path)).graph
        weights = {t.name for t in graph.initializer}
        assert not [
            n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
        ], path.name
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert nbits and {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {
            int(precision[3:])
        }
        assert path.stat().st_size < (tiny_model / path.name).stat().st_size / (
            2 if precision == "int8" else 3
        )
    assert_block_sizes(decoder[-1], manifest.spec.text, gate_up, DEFAULT_BLOCK_SIZE[precision])
    vit = onnx.load(str(model / "vit.onnx")).graph  # int8, whatever the decoder's precision
    assert manifest.source["vit_precision"] == "int8"
    ops = [n.op_type for n in vit.node]
    weights = {t.name for t in vit.initializer}
    # every encoder layer's linear layers in the int8 GEMM (q, k and v apart), the rows after a
    # LayerNorm quantised all at once, the others row by row from their maximum and minimum (no
    # Abs pass); the projector's two in fp32
    layers = manifest.spec.vision.num_layers
    assert ops.count("MatMulIntegerToFloat") == 6 * layers
    assert ops.count("DynamicQuantizeLinear") == 2 * layers
    assert ops.count("QuantizeLinear") == 2 * layers
    assert "Split" not in ops and "Abs" not in ops
    assert "MatMulNBits" not in ops
    assert len([n for n in vit.node if n.op_type == "MatMul" and n.input[1] in weights]) == 2
    assert ops.count("MultiHeadAttention") == (layers if fused else 0)
    assert "Softmax" not in ops if fused else ops.count("Softmax") == layers
    answer = Engine(model).answer(
        Request("What is in front of me?"), GenerationConfig(max_new_tokens=4)
    )
    assert answer.token_ids


def run_linear(quant, weight, bias, x, where, parts: int = 0, **options) -> np.ndarray:
    """One linear layer of ``quant`` on ``x`` (``parts``: through ``linear_parts``, the parts
    concatenated), loaded as the engine loads its graphs (for this CPU)."""
    g = Graph("one_linear", quant)
    x_name = g.input("x", np.float32, [1, "rows", weight.shape[1]])
    if parts:
        ys = g.linear_parts(x_name, weight, bias, parts, **options)
        for i, y in enumerate(ys):
            g.output(y, f"y{i}", np.float32, [1, "rows", weight.shape[0] // parts])
    else:
        g.output(g.linear(x_name, weight, bias, **options), "y0", np.float32, [1, "rows", None])
    onnx.save(g.model(), str(where / "linear.onnx"))
    session, _ = load_session(where / "linear.onnx", session_options(1))
    return np.concatenate(session.run(None, {"x": x}), axis=-1)


def test_row_int8_linear_is_its_definition(tmp_path):
    """RowInt8 in onnxruntime computes what it says: int8 weights with a scale per output channel,
    each row of x rounded to 255 levels of its own scale, on every CPU (where the CPU's u8 x s8 GEMM
    saturates, the engine reads the weights as uint8: test_cpus.py). The integer products are exact;
    the tolerance is float32's rounding of their sum and of the scales. A row of huge values (a
    token with massive activations) leaves the other rows' results bit for bit the same, and a zero
    row gives the bias."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((40, 96)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((1, 5, 96)).astype(np.float32)
    # every product of row 4 and column 0 positive: saturates int16
    x[0, 4] = np.abs(x[0, 4]) * np.sign(weight[0])
    y = run_linear(RowInt8(), weight, bias, x, tmp_path)
    values, channel_scales = quantize_channels(weight)
    assert values.dtype == np.int8 and values.shape == (96, 40) and np.abs(values).max() == 127
    row_scales = np.abs(x).max(-1, keepdims=True) / 127
    expected = (
        np.round(x / row_scales) @ values.astype(np.float32) * row_scales * channel_scales + bias
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    exact = x @ weight.T + bias
    assert np.all(np.linalg.norm(y - exact, axis=-1) < 0.02 * np.linalg.norm(exact, axis=-1))

    odd = x.copy()
    odd[0, 1] *= 1000
    odd[0, 3] = 0
    y_odd = run_linear(RowInt8(), weight, bias, odd, tmp_path)
    np.testing.assert_array_equal(y_odd[0, [0, 2, 4]], y[0, [0, 2, 4]])
    np.testing.assert_array_equal(y_odd[0, 3], bias)
    assert np.linalg.norm(y_odd[0, 1] - odd[0, 1] @ weight.T - bias) < 0.02 * np.linalg.norm(
        odd[0, 1] @ weight.T
    )


def test_row_int8_linear_after_a_gelu_takes_its_scale_from_the_maximum(tmp_path):
    """With ``floor`` (the ViT's fc2, after the GELU) a row's scale is max(its maximum, -floor) /
    127: what max|row| gives wherever the maximum reaches -floor, bit for bit, and coarser but
    never clipped where it does not."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((24, 64)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    x = rng.standard_normal((1, 4, 64)).astype(np.float32)
    x = x * 0.5 * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))  # GELU
    x[0, 2] = np.clip(x[0, 2], GELU_MINIMUM, 0.05)  # its maximum below -floor
    x = x.astype(np.float32)
    assert x.min() >= GELU_MINIMUM
    y = run_linear(RowInt8(), weight, bias, x, tmp_path, floor=GELU_MINIMUM)
    values, channel_scales = quantize_channels(weight)
    row_scales = np.maximum(x.max(-1, keepdims=True), -GELU_MINIMUM) / 127
    assert np.allclose(row_scales[0, [0, 1, 3]], np.abs(x[0, [0, 1, 3]]).max(-1)[:, None] / 127)
    expected = (
        np.round(x / row_scales) @ values.astype(np.float32) * row_scales * channel_scales + bias
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    plain = run_linear(RowInt8(), weight, bias, x, tmp_path)
    np.testing.assert_array_equal(y[0, [0, 1, 3]], plain[0, [0, 1, 3]])
    exact = x @ weight.T + bias
    assert np.all(np.linalg.norm(y - exact, axis=-1) < 0.02 * np.linalg.norm(exact, axis=-1))


def test_int8_linear_after_a_layer_norm_is_its_definition(tmp_path):
    """The ViT's int8 linear layers after a LayerNorm (``normed``): x quantised to uint8 with one
    scale and zero point for every row (DynamicQuantizeLinear: its range, 0 included), int8 weights
    per output channel, the bias added in the GEMM; exact integer products on every CPU (the u8
    reading of the weights where the CPU saturates: test_cpus.py), float32's rounding aside."""
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((40, 96)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((1, 7, 96)).astype(np.float32) + 0.5
    x[0, 2] = np.abs(x[0, 2]) * np.sign(weight[0])  # saturates an int16 pair sum
    y = run_linear(RowInt8(), weight, bias, x, tmp_path, normed=True)
    low, high = min(x.min(), 0), max(x.max(), 0)
    scale = (high - low) / 255
    zero = np.clip(np.round(-low / scale), 0, 255)
    q = np.clip(np.round(x / scale) + zero, 0, 255)
    values, channel_scales = quantize_channels(weight)
    expected = (q - zero) @ values.astype(np.float32) * scale * channel_scales + bias
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
    exact = x @ weight.T + bias
    assert np.all(np.linalg.norm(y - exact, axis=-1) < 0.02 * np.linalg.norm(exact, axis=-1))
    # InternViT's q, k and v: the rows quantised once, each part's product on its own, the same
    # numbers as the one product split
    parts = run_linear(RowInt8(), weight, bias, x, tmp_path, parts=4, normed=True)
    np.testing.assert_allclose(parts, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(parts, y, rtol=1e-6, atol=1e-5)
    fp32_parts = run_linear(None, weight, bias, x, tmp_path, parts=4, normed=True)
    np.testing.assert_allclose(fp32_parts, exact, rtol=1e-5, atol=1e-4)


@pytest.fixture
def with_prompt_graph(quantized):
    """The quantized export where it has a prompt graph; the others skip."""
    precision, model = quantized
    if Manifest.read(model).source["prefill"] != "int8":
        pytest.skip(
            f"{precision} has one decoder graph here (DEFAULT_PREFILL; the fused layout only)"
        )
    return model


def test_int8_prompts_run_through_the_prompt_graph_and_follow_the_decode_path(
    with_prompt_graph, tiny_model
):
    """The int8 export has a second graph for prompts, int8 per output channel
    (MatMulIntegerToFloat), beside the decode graph (MatMulNBits). A prompt run whole and the same
    tokens fed one at a time share the K/V buffers and end at logits close to each other and to
    fp32's, but not equal: they took different weights."""
    model = with_prompt_graph
    kinds = {
        name: {n.op_type for n in onnx.load(str(model / name)).graph.node if "MatMul" in n.op_type}
        for name in ("decoder.onnx", "prompt_decoder.onnx")
    }
    assert kinds == {
        "decoder.onnx": {"MatMulNBits"},
        "prompt_decoder.onnx": {"MatMulIntegerToFloat"},
    }
    engine, reference = Engine(model), Engine(tiny_model)
    assert engine.llm.prompt_path == model / "prompt_decoder.onnx"
    ids = engine.tokenizer.encode(" ".join(["Is there a red cube on the left of the table?"] * 8))
    assert len(ids) >= PROMPT_GRAPH_MIN_ROWS
    # First, on fresh buffers: the decode step after a prompt reads the K/V rows the prompt graph
    # wrote.
    whole = engine.llm.prefill(engine.llm.embed(ids), reuse_prefix=False)
    after_whole = engine.llm.decode(ids[0])
    fp32 = reference.llm.prefill(reference.llm.embed(ids), reuse_prefix=False)
    assert cosine(after_whole, reference.llm.decode(ids[0])) > 0.999
    engine.llm.prefill(engine.llm.embed(ids[:1]), reuse_prefix=False)
    for token in ids[1:]:
        stepwise = engine.llm.decode(token)
    assert not np.array_equal(whole, stepwise)
    assert (
        cosine(whole, stepwise) > 0.999
        and cosine(whole, fp32) > 0.999
        and cosine(stepwise, fp32) > 0.999
    )


def test_the_engine_changes_the_int8_graphs_only_where_the_cpu_needs_it(quantized):
    """Where the CPU's u8 x s8 GEMM saturates (x86 without VNNI), the ViT and the prompt graph
    read their int8 weights as uint8 (u8 x u8, exact everywhere); elsewhere every graph is taken
    as exported."""
    precision, model = quantized
    engine = Engine(model)
    if int8_gemm_exact():
        assert engine.cpu_changes == {}
        return
    expected = {"vit.onnx": ["int8 weights read as uint8 (u8 x u8)"]}
    if (model / "prompt_decoder.onnx").is_file():
        expected["prompt_decoder.onnx"] = ["int8 weights read as uint8 (u8 x u8)"]
    assert engine.cpu_changes == expected


def test_an_earlier_exports_block_int8_vit_runs_in_fp32_where_int8_saturates(tiny_hf, tmp_path):
    """Exports before the int8 GEMM ViT kept its weights in MatMulNBits blocks, whose int8 kernels
    on x86 without VNNI took a tile 1.24x fp32's time: there the engine still runs them as fp32
    weights; elsewhere as they are. Either way the features follow the fp32 ViT's."""
    from internvl_engine.config import ModelSpec, read_hf_config
    from internvl_engine.tools.checkpoint import Checkpoint
    from internvl_engine.tools.export import build_vit
    from internvl_engine.tools.graph import Quantization, save_model

    spec = ModelSpec.from_hf_config(read_hf_config(tiny_hf))
    for name, quant in (("blocks", Quantization(8, 128)), ("fp32", None)):
        save_model(build_vit(Checkpoint(tiny_hf), spec, quant), tmp_path / f"{name}.onnx")
    tile = np.random.default_rng(8).standard_normal((1, 3, spec.image_size, spec.image_size))
    outputs = {}
    for name in ("blocks", "fp32"):
        session, changes = load_session(tmp_path / f"{name}.onnx", session_options(1), True)
        outputs[name] = session.run(None, {"image": tile.astype(np.float32)})[0].reshape(-1)
        if name == "blocks":
            saturates = not int8_gemm_exact()
            assert changes == (["int8 blocks dequantized to fp32"] if saturates else [])
    assert cosine(outputs["blocks"], outputs["fp32"]) > 0.999


def test_a_missing_or_broken_prompt_graph_is_named(with_prompt_graph, tmp_path):
    from internvl_engine import InternVLError

    copy = tmp_path / "copy"
    shutil.copytree(with_prompt_graph, copy)
    (copy / "prompt_decoder.onnx").unlink()
    with pytest.raises(InternVLError, match="missing model files: prompt_decoder.onnx"):
        Engine(copy)
    (copy / "prompt_decoder.onnx").write_bytes(b"not a model")
    with pytest.raises(InternVLError, match="onnxruntime cannot load .*prompt_decoder.onnx"):
        Engine(copy)


def test_fidelity_report(quantized, tiny_model):
    precision, model = quantized
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "internvl_engine.tools.fidelity",
            "--reference",
            str(tiny_model),
            "--candidate",
            str(model),
            "--new-tokens",
            "6",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    ((name, report),) = json.loads(run.stdout)["candidates"].items()
    prompts = ", prompts int8" if Manifest.read(model).source["prefill"] == "int8" else ""
    gate_up = (
        f" (gate/up {DEFAULT_GATE_UP_BLOCK_SIZE[precision]})"
        if precision in DEFAULT_GATE_UP_BLOCK_SIZE
        else ""
    )
    blocks = f"blocks of {DEFAULT_BLOCK_SIZE[precision]}{gate_up}{prompts}"
    assert name == f"{model.name} ({precision}, {blocks})"
    assert [r["prompt"] for r in report["prompts"]] == [
        "text",
        "text-long",
        "1 image",
        "4 images",
        "video",
    ]
    overall = report["overall"]
    assert overall["steps"] == 5 * 6 and 0 <= overall["greedy_agreement"] <= 1
    # The tiny model's 64-wide layers quantise worse than InternVL2.5-1B's (docs/benchmarks.md has
    # those).
    assert overall["cosine_mean"] > (0.999 if precision == "int8" else 0.98)


def test_a_model_follows_itself_exactly(tiny_model):
    same = subprocess.run(
        [
            sys.executable,
            "-m",
            "internvl_engine.tools.fidelity",
            "--reference",
            str(tiny_model),
            "--candidate",
            str(tiny_model),
            "--new-tokens",
            "4",
            "--prompts",
            "text",
            "video",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    (report,) = json.loads(same.stdout)["candidates"].values()
    assert [r["prompt"] for r in report["prompts"]] == ["text", "video"]  # --prompts: only those
    assert (
        report["overall"]["greedy_agreement"] == 1.0 and report["overall"]["cosine_min"] > 0.99999
    )


def test_fidelity_refuses_exports_of_another_checkpoint(tiny_model, tmp_path):
    other = export(make_tiny(tmp_path / "hf", seed=1), tmp_path / "other", log=lambda *_: None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "internvl_engine.tools.fidelity",
            "--reference",
            str(tiny_model),
            "--candidate",
            str(tiny_model),
            str(tmp_path / "other"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and run.stdout == "", run.stdout
    assert run.stderr.startswith(
        f"internvl-fidelity: error: {tmp_path / 'other'} is an export of another checkpoint "
        f"than {tiny_model} (sha256 {other.source['sha256'][:12]}... against "
    ), run.stderr


def test_fidelity_table_of_several_candidates(quantized, tiny_model):
    """One table per candidate, then one row each side by side."""
    _, model = quantized
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "internvl_engine.tools.fidelity",
            "--reference",
            str(tiny_model),
            "--candidate",
            str(model),
            str(tiny_model),
            "--new-tokens",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("| prompt | steps |") == 2 and "| candidate | steps |" in run.stdout
    assert f"| {tiny_model.name} (fp32) | 15 | 1.00000 |" in run.stdout


def test_vit_precision(tiny_hf, tiny_model, tmp_path):
    """fp32 exports keep an fp32 ViT unless asked; int8 ViT features follow fp32's closely."""
    assert Manifest.read(tiny_model).source["vit_precision"] == "fp32"
    export(
        tiny_hf, tmp_path, LayerBuild(**TINY_BUILD_ARGS), vit_precision="int8", log=lambda *_: None
    )
    image = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    tile = Engine(tiny_model).prepare(Request("Describe.", images=[image])).pixel_values[:1]
    a, b = (Engine(m).vit.run({"image": tile})[0].reshape(-1) for m in (tiny_model, tmp_path))
    assert 0.999 < cosine(a, b) < 1


@pytest.mark.parametrize("contract", ["fused", "dynamic"])
def test_a_given_block_size_holds_for_every_matrix(tiny_hf, tmp_path, contract):
    """--block-size alone: every matrix, gate and up too; --gate-up-block-size beside it: those
    two."""
    for name, sizes in (
        ("uniform", dict(block_size=16)),
        ("split", dict(block_size=16, gate_up_block_size=32)),
    ):
        out = tmp_path / name
        export(
            tiny_hf,
            out,
            LayerBuild(**TINY_BUILD_ARGS),
            contract,
            precision="int4",
            log=lambda *_: None,
            **sizes,
        )
        manifest = Manifest.read(out)
        gate_up = sizes.get("gate_up_block_size", 16)
        assert (manifest.source["block_size"], manifest.source["gate_up_block_size"]) == (
            16,
            gate_up,
        )
        decoder = out / ("decoder.onnx" if contract == "fused" else "layer_0.onnx")
        assert_block_sizes(decoder, manifest.spec.text, gate_up, 16)


def test_export_refuses_bad_quantization(tiny_hf, tmp_path):
    from internvl_engine import InternVLError

    with pytest.raises(InternVLError, match="block size 24 must be a power of 2"):
        export(tiny_hf, tmp_path / "a", precision="int4", block_size=24, log=lambda *_: None)
    with pytest.raises(
        InternVLError, match="gate/up block size 8 must be a power of 2, at least 16"
    ):
        export(tiny_hf, tmp_path / "a", precision="int4", gate_up_block_size=8, log=lambda *_: None)
    with pytest.raises(InternVLError, match="the axmodel contract is fp32"):
        export(tiny_hf, tmp_path / "b", contract="axmodel", precision="int8", log=lambda *_: None)
    with pytest.raises(InternVLError, match="the axmodel contract is fp32"):
        export(
            tiny_hf, tmp_path / "c", contract="axmodel", vit_precision="int8", log=lambda *_: None
        )
    with pytest.raises(InternVLError, match="--prefill int8 needs the fused contract"):
        export(
            tiny_hf,
            tmp_path / "d",
            contract="dynamic",
            precision="int8",
            prefill="int8",
            log=lambda *_: None,
        )
    with pytest.raises(InternVLError, match="unknown prefill 'int4'"):
        export(tiny_hf, tmp_path / "e", precision="int8", prefill="int4", log=lambda *_: None)
