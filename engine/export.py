"""``internvl-export``: turn an original InternVL2.5 checkpoint into the model directory the engine
runs.

The graphs are written directly with ``onnx.helper`` from the safetensors weights (numpy only, no
torch, no ``trust_remote_code``). Three layouts (``--contract``):

- ``fused`` (default, the CPU's): ``decoder.onnx``, every decoder layer and the lm_head in one
  graph: ``inputs_embeds`` [1, T, H], ``seqlens_k`` (int32 [1], the last position), ``total_sequence_length``
  and per layer ``past_key_{i}``/``past_value_{i}`` [1, kv_heads, M, head_dim] -> ``logits`` of the
  last row [1, 1, vocab] and ``present_key_{i}``/``present_value_{i}``. onnxruntime's
  GroupQueryAttention (rotary inside) reads and writes the cache in place when past and present are
  bound to one buffer and takes Q/K/V packed as one matmul makes them; SkipSimplifiedLayerNormalization
  fuses each residual add with its RMSNorm; gate and up are one matmul too.
- ``dynamic``: the AX650N layer contract with dynamic shapes, one ``layer_{i}.onnx`` per layer:
  ``K_cache``, ``V_cache`` [1, C, kv_dim], ``indices`` [1, T] (uint32 absolute positions), ``input``
  [1, T, H], ``mask`` [1, T, C + T] (additive) -> new K rows, new V rows [1, T, kv_dim] (K after
  RoPE), ``output`` [1, T, H]; and ``post.onnx``: ``input`` [1, T, H] -> ``output`` [1, T, vocab].
- ``axmodel``: the same contract with exactly the shape groups Pulsar2 ``llm_build`` compiles.

Beside them: ``vit.onnx`` (``image`` [1, 3, S, S] -> ``output`` [1, N, H]: InternViT, drop CLS,
pixel shuffle, ``mlp1``), the embedding table (looked up on the host), the tokenizer files,
``config.json`` and ``manifest.json`` (sizes, build limits, file names, source checkpoint with its
sha256, contract and precision), so the directory is self-contained.

``--precision int8|int4`` stores the decoder's weights (lm_head included) block-wise quantised for
onnxruntime's MatMulNBits (biases added inside it): ``--block-size`` weights share a scale and zero
point (``--gate-up-block-size`` in the MLP's gate and up projections), and ``--accuracy-level 4``
multiplies in int8 on the CPU. The ViT's linear layers then go to int8 as well
(``--vit-precision``). MatMulNBits is the fastest for one row (a decode step is bound by reading the
weights); for many rows onnxruntime's int8 GEMM is faster, so ``--prefill int8`` (the default with
int8) writes ``prompt_decoder.onnx`` beside the fused decoder: the same graph with ``RowInt8``
weights, which the engine runs for prompts over the same K/V buffers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .cli import exit_on_sigterm
from .config import MANIFEST, LayerBuild, Manifest, ModelSpec, read_hf_config
from .errors import InternVLError, ModelDirError

OPSET = 17
IR_VERSION = 8  # readable by older onnxruntime releases on boards
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "generation_config.json",
    "config.json",
)
_ONNX_DTYPE = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.uint32): TensorProto.UINT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
}
MS = "com.microsoft"  # onnxruntime's contrib operators


@dataclass(frozen=True)
class Quantization:
    """Block-wise weight quantisation for MatMulNBits (asymmetric: a scale and zero point per
    block)."""

    bits: int  # 8 or 4
    block_size: int = 32
    accuracy_level: int = 4  # 4: int8 compute (CPU, AVX-512 VNNI / AVX2); 0: float
    gate_up_block_size: int | None = None  # the MLP's gate and up projections (None: block_size)


@dataclass(frozen=True)
class RowInt8:
    """int8 weights with one scale per output channel, multiplied by onnxruntime's int8 GEMM
    (MatMulIntegerToFloat, VNNI) with the activations quantised at run time to uint8, one scale per
    row: a row of unusual magnitude (a token with massive activations) costs no other row precision.
    For 384 rows at InternVL2.5-1B's sizes this GEMM takes about half of MatMulNBits' time (int8,
    blocks of 128); for one row it is slower than MatMulNBits (docs/benchmarks.md)."""


def quantize_channels(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] (out, in) -> the int8 GEMM's B [K, N] (int8, symmetric in [-127, 127]) and one
    scale per output channel [N]."""
    scale = np.abs(weight).max(1) / 127
    scale[scale == 0] = 1.0
    values = np.clip(np.round(weight / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(values.T), scale.astype(np.float32)


def quantize_blocks(
    weight: np.ndarray, q: Quantization
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [N, K] (out, in) -> MatMulNBits' B [N, blocks, block_size * bits / 8] (uint8, 4-bit
    values two to a byte, low nibble first), scales [N * blocks] and zero points (packed the same
    way). Each block's range includes 0, so zero weights stay exactly zero."""
    n, k = weight.shape
    blocks = -(-k // q.block_size)
    padded = np.zeros((n, blocks * q.block_size), np.float32)
    padded[:, :k] = weight
    padded = padded.reshape(n, blocks, q.block_size)
    low, high = np.minimum(padded.min(-1), 0), np.maximum(padded.max(-1), 0)
    top = 2**q.bits - 1
    scale = (high - low) / top
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-low / scale), 0, top)
    values = np.clip(np.round(padded / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    zero = zero.astype(np.uint8)
    if q.bits == 4:
        values = values[..., 0::2] | (values[..., 1::2] << 4)
        zero = np.pad(zero, ((0, 0), (0, blocks % 2)))
        zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    return (
        np.ascontiguousarray(values),
        scale.astype(np.float32).reshape(-1),
        np.ascontiguousarray(zero).reshape(-1),
    )


class Checkpoint:
    """Lazy float32 access to an original InternVL safetensors checkpoint (single or sharded)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (hf_dir / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise ModelDirError(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json)")
        self.files = [hf_dir / s for s in shards]
        self._where = {}
        try:
            for f in self.files:
                handle = safe_open(str(f), framework="numpy")
                self._where.update({k: handle for k in handle.keys()})
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelDirError(f"{hf_dir}: cannot read safetensors ({e})") from e

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ModelDirError(
                f"checkpoint lacks tensor {name!r} (not the original InternVL2.5 layout?)"
            )
        return np.asarray(self._where[name].get_tensor(name), dtype=np.float32)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        return h.hexdigest()


class Graph:
    """Just enough of a graph builder: named values are strings, constants become initializers.
    ``linear`` layers keep their weights as ``quant`` says (None: fp32; ``Quantization``: block-wise
    for MatMulNBits; ``RowInt8``)."""

    def __init__(self, name: str, quant: Quantization | RowInt8 | None = None):
        self.name, self.quant = name, quant
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _ONNX_DTYPE[np.dtype(dtype)], shape))
        return name

    def output(self, value: str, name: str, dtype, shape) -> None:
        """``value`` as graph output ``name``: written there directly when ``value`` is that
        name."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(
            helper.make_tensor_value_info(name, _ONNX_DTYPE[np.dtype(dtype)], shape)
        )

    def const(self, array, hint: str = "c") -> str:
        name = self._fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, **attrs):
        """A node; ``outputs``: how many (fresh names), or their names. ``domain=MS`` for contrib
        ops."""
        names = (
            outputs
            if isinstance(outputs, list)
            else [self._fresh(op_type.lower()) for _ in range(outputs)]
        )
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if len(names) == 1 else names

    # Layers used by several models.
    def linear(
        self, x: str, weight: np.ndarray, bias: np.ndarray | None = None, gate_up: bool = False
    ) -> str:
        """x @ weight.T (+ bias); weight [out, in] as the checkpoint stores it. ``gate_up``: the
        MLP's gate and up projections, in blocks of ``Quantization.gate_up_block_size`` where it is
        set."""
        if self.quant is None:
            y = self.op("MatMul", x, self.const(np.ascontiguousarray(weight.T), "w"))
        elif isinstance(self.quant, RowInt8):
            y = self._row_int8_matmul(x, weight)
        else:
            k = weight.shape[
                1
            ]  # a block never spans more than a row: a narrower matrix gets smaller blocks
            block_size = (gate_up and self.quant.gate_up_block_size) or self.quant.block_size
            quant = replace(self.quant, block_size=min(block_size, 1 << (k.bit_length() - 1)))
            values, scales, zeros = quantize_blocks(weight, quant)
            inputs = [
                x,
                self.const(values, "wq"),
                self.const(scales, "ws"),
                self.const(zeros, "wz"),
            ]
            if (
                bias is not None
            ):  # added inside the kernel (inputs 4 and 5: no g_idx, then the bias)
                inputs += ["", self.const(bias, "b")]
            return self.op(
                "MatMulNBits",
                *inputs,
                domain=MS,
                K=k,
                N=weight.shape[0],
                bits=quant.bits,
                block_size=quant.block_size,
                accuracy_level=quant.accuracy_level,
            )
        return y if bias is None else self.op("Add", y, self.const(bias, "b"))

    def _row_int8_matmul(self, x: str, weight: np.ndarray) -> str:
        """``RowInt8``: x [..., K] -> uint8 rows (zero point 128, scale max|row| / 127) ->
        MatMulIntegerToFloat (the int8 GEMM, the channel scales applied as it writes the floats) ->
        times each row's scale."""
        n, k = weight.shape
        values, channel_scales = quantize_channels(weight)
        peak = self.op("ReduceMax", self.op("Abs", x), axes=[-1], keepdims=1)
        row_scales = self.op(
            "Max",
            self.op("Mul", peak, self.const(np.float32(1 / 127), "inv127")),
            self.const(np.float32(np.finfo(np.float32).tiny), "tiny"),
        )  # an all-zero row
        rows = self.reshape(x, [-1, k])
        zero = self.const(np.uint8(128), "zero")
        quantized = self.op(
            "QuantizeLinear",
            rows,
            self.reshape(row_scales, [-1]),
            self.op("Expand", zero, self.op("Shape", rows, end=1)),
            axis=0,
        )
        y = self.op(
            "MatMulIntegerToFloat",
            quantized,
            self.const(values, "wq"),
            self.const(np.float32(1), "one"),
            self.const(channel_scales, "ws"),
            zero,
            domain=MS,
        )
        y = self.op(
            "Reshape",
            y,
            self.op(
                "Concat", self.op("Shape", x, end=-1), self.const(np.array([n], np.int64)), axis=0
            ),
        )
        return self.op("Mul", y, row_scales)

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", x, self.const(np.array(shape, dtype=np.int64), "shape"))

    def layer_norm(self, x: str, weight, bias, eps: float) -> str:
        return self.op(
            "LayerNormalization",
            x,
            self.const(weight, "ln_w"),
            self.const(bias, "ln_b"),
            axis=-1,
            epsilon=eps,
        )

    def rms_norm(self, x: str, weight, eps: float) -> str:
        var = self.op("ReduceMean", self.op("Mul", x, x), axes=[-1], keepdims=1)
        inv = self.op(
            "Reciprocal", self.op("Sqrt", self.op("Add", var, self.const(np.float32(eps), "eps")))
        )
        return self.op("Mul", self.op("Mul", x, inv), self.const(weight, "rms_w"))

    def gelu(self, x: str) -> str:  # exact (erf) GELU, as torch's nn.GELU()
        e = self.op("Erf", self.op("Div", x, self.const(np.float32(np.sqrt(2.0)), "sqrt2")))
        return self.op(
            "Mul",
            self.op("Mul", x, self.const(np.float32(0.5), "half")),
            self.op("Add", e, self.const(np.float32(1.0), "one")),
        )

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS for n in self.nodes):
            opsets.append(helper.make_opsetid(MS, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="internvl-export")
        m.ir_version = IR_VERSION
        return m


PRECISIONS = {"fp32": None, "int8": 8, "int4": 4}  # name -> MatMulNBits bits
# Measured at InternVL2.5-1B's dimensions (docs/benchmarks.md): int8 in blocks of 128 follows fp32
# with a logit cosine of 0.9994 and decodes faster than in blocks of 32 (0.9996); int4 loses more
# with every doubling (0.944 in blocks of 32, 0.928 of 64, 0.914 of 128), so it keeps the finest
# blocks, except in the MLP's gate and up projections: blocks of 128 there decode 1.14x as fast as
# blocks of 32 everywhere, at 0.9365 (onnxruntime-genai's int4: 0.937). The down projections and the
# lm_head are the matrices llama.cpp's Q4_K_M gives more bits on trained models; gate and up are its
# base type.
DEFAULT_BLOCK_SIZE = {"int8": 128, "int4": 32}
DEFAULT_GATE_UP_BLOCK_SIZE = {"int4": 128}
# The ViT with a quantised decoder: int8 in blocks of 128 takes 0.6 of fp32's time per 448 px tile,
# with features at cosine 0.9998 to fp32's; int4 would cost 0.98 (docs/benchmarks.md).
VIT_QUANTIZATION = Quantization(8, 128)
VIT_PRECISIONS = ("fp32", "int8")
# How the fused decoder multiplies prompts: "same" as decode steps, or "int8" with a second graph of
# RowInt8 weights (prompt_decoder.onnx). For int8 a 384-token prefill took 0.61 of the time at
# InternVL2.5-1B's sizes, for 0.5 GB more on disk and 0.85 GB more in memory (docs/benchmarks.md);
# int4 is about small weights and keeps one graph.
PREFILLS = {"same": None, "int8": RowInt8()}
DEFAULT_PREFILL = {"fp32": "same", "int8": "int8", "int4": "same"}


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save; weights go to an external file only when the protobuf would pass its 2 GB limit."""
    if sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    else:
        onnx.save_model(model, str(path))


def build_vit(
    ck: Checkpoint, spec: ModelSpec, quant: Quantization | None = None
) -> onnx.ModelProto:
    v = spec.vision
    if v.qk_normalization or v.norm_type != "layer_norm":
        raise ModelDirError(
            "vision encoders with qk_normalization or rms_norm are not supported "
            "(InternVL2.5-1B's InternViT-300M uses neither)"
        )
    d, p, s, nh = v.hidden_size, v.patch_size, v.image_size, v.num_heads
    side = s // p
    hd = d // nh
    g = Graph("internvl_vit", quant)
    x = g.input("image", np.float32, [1, 3, s, s])
    emb = "vision_model.embeddings."
    x = g.op(
        "Conv",
        x,
        g.const(ck.get(emb + "patch_embedding.weight")),
        g.const(ck.get(emb + "patch_embedding.bias")),
        kernel_shape=[p, p],
        strides=[p, p],
    )
    x = g.op("Transpose", g.reshape(x, [1, d, side * side]), perm=[0, 2, 1])
    x = g.op("Concat", g.const(ck.get(emb + "class_embedding")), x, axis=1)
    x = g.op("Add", x, g.const(ck.get(emb + "position_embedding")))
    for i in range(v.num_layers):
        pre = f"vision_model.encoder.layers.{i}."
        h = g.layer_norm(
            x, ck.get(pre + "norm1.weight"), ck.get(pre + "norm1.bias"), v.layer_norm_eps
        )
        qkv_w = ck.get(pre + "attn.qkv.weight")
        qkv_b = ck.get(pre + "attn.qkv.bias") if v.qkv_bias else np.zeros(3 * d, np.float32)
        q, k, val = (
            g.linear(h, qkv_w[j * d : (j + 1) * d], qkv_b[j * d : (j + 1) * d]) for j in range(3)
        )
        q = g.op("Transpose", g.reshape(q, [1, -1, nh, hd]), perm=[0, 2, 1, 3])
        k = g.op("Transpose", g.reshape(k, [1, -1, nh, hd]), perm=[0, 2, 3, 1])
        val = g.op("Transpose", g.reshape(val, [1, -1, nh, hd]), perm=[0, 2, 1, 3])
        scores = g.op("Mul", g.op("MatMul", q, k), g.const(np.float32(hd**-0.5), "scale"))
        a = g.op("MatMul", g.op("Softmax", scores, axis=-1), val)
        a = g.reshape(g.op("Transpose", a, perm=[0, 2, 1, 3]), [1, -1, d])
        a = g.linear(a, ck.get(pre + "attn.proj.weight"), ck.get(pre + "attn.proj.bias"))
        x = g.op("Add", x, g.op("Mul", a, g.const(ck.get(pre + "ls1"), "ls1")))
        h = g.layer_norm(
            x, ck.get(pre + "norm2.weight"), ck.get(pre + "norm2.bias"), v.layer_norm_eps
        )
        h = g.linear(
            g.gelu(g.linear(h, ck.get(pre + "mlp.fc1.weight"), ck.get(pre + "mlp.fc1.bias"))),
            ck.get(pre + "mlp.fc2.weight"),
            ck.get(pre + "mlp.fc2.bias"),
        )
        x = g.op("Add", x, g.op("Mul", h, g.const(ck.get(pre + "ls2"), "ls2")))
    # Drop CLS, then InternVL's pixel shuffle (ps_version v2) on the [1, w, h, c] patch grid.
    x = g.op(
        "Slice",
        x,
        g.const(np.array([1], np.int64)),
        g.const(np.array([side * side + 1], np.int64)),
        g.const(np.array([1], np.int64)),
    )
    r = int(round(1 / spec.downsample_ratio))
    x = g.reshape(x, [1, side, side // r, d * r])
    x = g.op("Transpose", x, perm=[0, 2, 1, 3])
    x = g.reshape(x, [1, side // r, side // r, d * r * r])
    x = g.op("Transpose", x, perm=[0, 2, 1, 3])
    x = g.reshape(x, [1, (side // r) ** 2, d * r * r])
    x = g.layer_norm(
        x, ck.get("mlp1.0.weight"), ck.get("mlp1.0.bias"), 1e-5
    )  # nn.LayerNorm default eps
    x = g.linear(
        g.gelu(g.linear(x, ck.get("mlp1.1.weight"), ck.get("mlp1.1.bias"))),
        ck.get("mlp1.3.weight"),
        ck.get("mlp1.3.bias"),
    )
    g.output(x, "output", np.float32, [1, spec.num_image_token, spec.text.hidden_size])
    return g.model()


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    return (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(
        np.float32
    )


def layer_groups(build: LayerBuild) -> list[tuple[int, int]]:
    """(history capacity C, tokens T) of each fixed-shape group, in Pulsar2 ``llm_build``'s order:
    decode against the full cache, then prefill chunks after C = 0, T, 2T, ... history rows."""
    chunk = build.prefill_chunk
    return [(build.kv_cache_len, 1)] + [
        (c, chunk) for c in range(0, build.max_prompt_tokens, chunk)
    ]


def build_layer(
    ck: Checkpoint,
    spec: ModelSpec,
    i: int,
    group: tuple[int, int] | None = None,
    quant: Quantization | None = None,
) -> onnx.ModelProto:
    """One Qwen2 decoder layer driven with an explicit KV cache (the "together" model contract).
    ``group``: (C, T) for one fixed-shape group; the no-history group (C = 0) takes the contract's
    dummy [1, 1, H] K/V inputs and does not read them."""
    t = spec.text
    hsz, nh, nkv, hd = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
    q_per_kv = nh // nkv
    pre = f"language_model.model.layers.{i}."
    capacity, tokens = group if group else ("history", "tokens")
    total = capacity + tokens if group else "total"
    history_shape = [1, 1, hsz] if capacity == 0 else [1, capacity, t.kv_dim]
    g = Graph(f"qwen2_layer_{i}", quant)
    k_cache = g.input("K_cache", np.float32, history_shape)
    v_cache = g.input("V_cache", np.float32, history_shape)
    indices = g.input("indices", np.uint32, [1, tokens])
    x = g.input("input", np.float32, [1, tokens, hsz])
    mask = g.input("mask", np.float32, [1, tokens, total])

    h = g.rms_norm(x, ck.get(pre + "input_layernorm.weight"), t.rms_norm_eps)
    q = g.linear(h, ck.get(pre + "self_attn.q_proj.weight"), ck.get(pre + "self_attn.q_proj.bias"))
    k = g.linear(h, ck.get(pre + "self_attn.k_proj.weight"), ck.get(pre + "self_attn.k_proj.bias"))
    v_new = g.linear(
        h, ck.get(pre + "self_attn.v_proj.weight"), ck.get(pre + "self_attn.v_proj.bias")
    )

    # RoPE (rotate-half form) on [1, T, heads, hd] with cos/sin [1, T, 1, hd].
    freqs = g.op(
        "Mul",
        g.op(
            "Unsqueeze",
            g.op("Cast", indices, to=TensorProto.FLOAT),
            g.const(np.array([-1], np.int64)),
        ),
        g.const(rope_inv_freq(hd, t.rope_theta), "inv_freq"),
    )
    angles = g.op(
        "Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const(np.array([2], np.int64))
    )
    cos, sin = g.op("Cos", angles), g.op("Sin", angles)
    halves = g.const(np.array([hd // 2, hd // 2], np.int64))

    def rope(y):
        first, second = g.op("Split", y, halves, axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
        return g.op("Add", g.op("Mul", y, cos), g.op("Mul", rotated, sin))

    q = rope(g.reshape(q, [0, 0, nh, hd]))
    k_new = g.reshape(rope(g.reshape(k, [0, 0, nkv, hd])), [0, 0, t.kv_dim])

    all_k, all_v = (
        (k_new, v_new)
        if capacity == 0
        else (g.op("Concat", k_cache, k_new, axis=1), g.op("Concat", v_cache, v_new, axis=1))
    )
    keys = g.op("Transpose", g.reshape(all_k, [0, 0, nkv, hd]), perm=[0, 2, 3, 1])
    values = g.op("Transpose", g.reshape(all_v, [0, 0, nkv, hd]), perm=[0, 2, 1, 3])
    # Grouped-query attention without repeating K/V: query heads of one KV head are stacked along
    # rows.
    q = g.reshape(
        g.op("Transpose", q, perm=[0, 2, 1, 3]), [1, nkv, -1, hd]
    )  # [1, nkv, group*T, hd]
    scores = g.op("Mul", g.op("MatMul", q, keys), g.const(np.float32(hd**-0.5), "scale"))
    group_mask = g.op(
        "Unsqueeze", g.op("Concat", *([mask] * q_per_kv), axis=1), g.const(np.array([1], np.int64))
    )
    probs = g.op("Softmax", g.op("Add", scores, group_mask), axis=-1)
    a = g.reshape(g.op("MatMul", probs, values), [1, nh, -1, hd])
    a = g.reshape(g.op("Transpose", a, perm=[0, 2, 1, 3]), [0, 0, hsz])
    x = g.op("Add", x, g.linear(a, ck.get(pre + "self_attn.o_proj.weight")))

    h = g.rms_norm(x, ck.get(pre + "post_attention_layernorm.weight"), t.rms_norm_eps)
    gate = g.linear(h, ck.get(pre + "mlp.gate_proj.weight"), gate_up=True)
    up = g.linear(h, ck.get(pre + "mlp.up_proj.weight"), gate_up=True)
    act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    x = g.op("Add", x, g.linear(act, ck.get(pre + "mlp.down_proj.weight")))

    g.output(k_new, "K", np.float32, [1, tokens, t.kv_dim])
    g.output(v_new, "V", np.float32, [1, tokens, t.kv_dim])
    g.output(x, "output", np.float32, [1, tokens, hsz])
    return g.model()


def lm_head_weight(ck: Checkpoint, spec: ModelSpec) -> np.ndarray:
    if "language_model.lm_head.weight" in ck:
        return ck.get("language_model.lm_head.weight")
    if spec.text.tie_word_embeddings:
        return ck.get("language_model.model.embed_tokens.weight")
    raise ModelDirError(
        "checkpoint lacks language_model.lm_head.weight and embeddings are not tied"
    )


def build_post(
    ck: Checkpoint, spec: ModelSpec, tokens: int | str = "tokens", quant: Quantization | None = None
) -> onnx.ModelProto:
    t = spec.text
    g = Graph("qwen2_post", quant)
    x = g.input("input", np.float32, [1, tokens, t.hidden_size])
    x = g.rms_norm(x, ck.get("language_model.model.norm.weight"), t.rms_norm_eps)
    g.output(g.linear(x, lm_head_weight(ck, spec)), "output", np.float32, [1, tokens, t.vocab_size])
    return g.model()


def build_decoder(
    ck: Checkpoint, spec: ModelSpec, build: LayerBuild, quant: Quantization | RowInt8 | None = None
) -> onnx.ModelProto:
    """Every decoder layer and the lm_head as one graph, the KV cache read and written in place by
    GroupQueryAttention (see the module docstring for the inputs and outputs). Only the last row's
    logits are computed: a prompt needs no others."""
    t = spec.text
    hsz, nh, nkv, hd, eps = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.rms_norm_eps
    cache = [1, nkv, build.kv_cache_len, hd]
    g = Graph("qwen2_decoder", quant)
    x = g.input("inputs_embeds", np.float32, [1, "tokens", hsz])
    seqlens = g.input("seqlens_k", np.int32, [1])
    total = g.input("total_sequence_length", np.int32, [])
    angles = (
        np.arange(build.kv_cache_len, dtype=np.float64)[:, None]
        * rope_inv_freq(hd, t.rope_theta)[None]
    )
    cos, sin = (
        g.const(np.cos(angles).astype(np.float32), "cos"),
        g.const(np.sin(angles).astype(np.float32), "sin"),
    )
    residual = None
    for i in range(t.num_layers):
        pre = f"language_model.model.layers.{i}."
        w = lambda name: ck.get(pre + name)  # noqa: E731
        if residual is None:
            residual, h = (
                x,
                g.op(
                    "SimplifiedLayerNormalization",
                    x,
                    g.const(w("input_layernorm.weight"), "ln"),
                    axis=-1,
                    epsilon=eps,
                ),
            )
        else:  # the MLP's output joins the residual stream, normalised for this layer in one node
            h, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization",
                x,
                residual,
                g.const(w("input_layernorm.weight"), "ln"),
                outputs=4,
                domain=MS,
                epsilon=eps,
            )
        qkv = g.linear(
            h,
            np.concatenate([w(f"self_attn.{n}_proj.weight") for n in "qkv"]),
            np.concatenate([w(f"self_attn.{n}_proj.bias") for n in "qkv"]),
        )
        for kind in ("key", "value"):
            g.input(f"past_{kind}_{i}", np.float32, cache)
        attention, *_ = g.op(
            "GroupQueryAttention",
            qkv,
            "",
            "",
            f"past_key_{i}",
            f"past_value_{i}",
            seqlens,
            total,
            cos,
            sin,
            outputs=[g._fresh("gqa"), f"present_key_{i}", f"present_value_{i}"],
            domain=MS,
            num_heads=nh,
            kv_num_heads=nkv,
            do_rotary=1,
            rotary_interleaved=0,
        )
        for kind in ("key", "value"):
            g.output(f"present_{kind}_{i}", f"present_{kind}_{i}", np.float32, cache)
        h, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization",
            g.linear(attention, w("self_attn.o_proj.weight")),
            residual,
            g.const(w("post_attention_layernorm.weight"), "ln"),
            outputs=4,
            domain=MS,
            epsilon=eps,
        )
        gate, up = g.op(
            "Split",
            g.linear(
                h,
                np.concatenate([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]),
                gate_up=True,
            ),
            g.const(np.array([t.intermediate_size] * 2, np.int64)),
            axis=-1,
            outputs=2,
        )
        x = g.linear(
            g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), w("mlp.down_proj.weight")
        )
    h, *_ = g.op(
        "SkipSimplifiedLayerNormalization",
        x,
        residual,
        g.const(ck.get("language_model.model.norm.weight"), "ln"),
        outputs=4,
        domain=MS,
        epsilon=eps,
    )
    last = g.op(
        "Slice",
        h,
        g.const(np.array([-1], np.int64)),
        g.const(np.array([2**31 - 1], np.int64)),
        g.const(np.array([1], np.int64)),
    )
    g.output(g.linear(last, lm_head_weight(ck, spec)), "logits", np.float32, [1, 1, t.vocab_size])
    g.outputs.insert(0, g.outputs.pop())  # logits first
    return g.model()


def save_embeddings_bf16(table: np.ndarray, path: Path) -> None:
    """The seed's ``model.embed_tokens.weight.bfloat16.bin``: fp32 truncated to its upper 16
    bits."""
    (np.ascontiguousarray(table, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).tofile(
        path
    )


CONTRACTS = ("fused", "dynamic", "axmodel")


def default_contract() -> str:
    """The fused layout, unless the onnxruntime installed here predates its operators (Ubuntu
    22.04's numpy 1.21 allows onnxruntime 1.12 at most): then the per-layer one, which any
    onnxruntime runs."""
    from .fused import runs_here

    return "fused" if runs_here() else "dynamic"


def export(
    hf_dir: Path,
    out_dir: Path,
    build: LayerBuild = LayerBuild(),
    contract: str | None = None,
    precision: str = "fp32",
    block_size: int | None = None,
    accuracy_level: int = 4,
    vit_precision: str | None = None,
    prefill: str | None = None,
    gate_up_block_size: int | None = None,
    log=print,
) -> Manifest:
    """``contract``: "fused" (the whole decoder in one graph, the CPU's fastest), "dynamic" (one
    ONNX file per layer, any shapes) or "axmodel" (one ONNX file per fixed-shape group of each
    layer, exactly the shapes Pulsar2 ``llm_build`` compiles, a [1, 1, H] post model and the bf16
    embedding file), to run the board's driving logic on a CPU; by default ``default_contract()``.
    ``precision``: fp32, int8 or int4 decoder weights, in blocks of ``block_size``, the MLP's gate
    and up projections in blocks of ``gate_up_block_size`` (by default ``block_size``; without a
    ``block_size``: ``DEFAULT_BLOCK_SIZE`` and ``DEFAULT_GATE_UP_BLOCK_SIZE``). ``vit_precision``:
    fp32 or int8 (``VIT_QUANTIZATION``); by default int8 with a quantised decoder, else fp32.
    ``prefill`` (fused only): "same" (prompts through the decode graph) or "int8" (prompts through
    ``prompt_decoder.onnx``, ``RowInt8``); by default ``DEFAULT_PREFILL``."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise ModelDirError(f"{hf_dir}: no such checkpoint directory")
    if contract is None:
        contract = default_contract()
        if contract != "fused":
            log(
                f"onnxruntime here predates the fused decoder's operators: writing the {contract} "
                "layout"
            )
    if contract not in CONTRACTS:
        raise InternVLError(f"unknown contract {contract!r} (choose from {', '.join(CONTRACTS)})")
    if precision not in PRECISIONS:
        raise InternVLError(
            f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})"
        )
    vit_precision = vit_precision or ("fp32" if precision == "fp32" else "int8")
    if vit_precision not in VIT_PRECISIONS:
        raise InternVLError(
            f"unknown ViT precision {vit_precision!r} (choose from {', '.join(VIT_PRECISIONS)})"
        )
    if contract == "axmodel" and (precision, vit_precision) != ("fp32", "fp32"):
        raise InternVLError("the axmodel contract is fp32: Pulsar2 quantises for the NPU itself")
    if prefill is None:
        prefill = DEFAULT_PREFILL[precision] if contract == "fused" else "same"
    if prefill not in PREFILLS:
        raise InternVLError(f"unknown prefill {prefill!r} (choose from {', '.join(PREFILLS)})")
    if prefill != "same" and contract != "fused":
        raise InternVLError(
            f"--prefill {prefill} needs the fused contract: the {contract} layout has no "
            "separate prompt graph"
        )
    if precision == "fp32" and (block_size, gate_up_block_size) != (None, None):
        raise InternVLError(
            "block sizes are for int8 and int4 weights: fp32 has no blocks (give --precision)"
        )
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE.get(precision, 0)
        if gate_up_block_size is None:
            gate_up_block_size = DEFAULT_GATE_UP_BLOCK_SIZE.get(precision)
    if gate_up_block_size is None:  # 0 is a size, and refused below
        gate_up_block_size = block_size
    if precision != "fp32":
        for name, size in (("block size", block_size), ("gate/up block size", gate_up_block_size)):
            if size < 16 or size & (size - 1):
                raise InternVLError(f"{name} {size} must be a power of 2, at least 16")
    spec = ModelSpec.from_hf_config(read_hf_config(hf_dir))
    if contract == "axmodel" and build.max_prompt_tokens % build.prefill_chunk:
        raise InternVLError(
            f"max prompt tokens {build.max_prompt_tokens} must be a multiple of the prefill chunk "
            f"({build.prefill_chunk}) for fixed-shape groups"
        )
    bits = PRECISIONS[precision]
    quant = Quantization(bits, block_size, accuracy_level, gate_up_block_size) if bits else None
    ck = Checkpoint(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Written into a staging folder beside the files, then moved over them: a process running the
    # old model keeps reading its own files (the embedding table is memory-mapped), and an export
    # that fails leaves the directory as it was.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        save_model(
            build_vit(ck, spec, VIT_QUANTIZATION if vit_precision == "int8" else None),
            staging / "vit.onnx",
        )
        log(f"vit.onnx: {spec.num_image_token} tokens per {spec.image_size}px tile")
        files = {"vit": "vit.onnx", "embeddings": "embed_tokens.npy"}
        if contract == "fused":
            files["decoder"] = "decoder.onnx"
            save_model(build_decoder(ck, spec, build, quant), staging / files["decoder"])
            log(
                f"decoder.onnx: {spec.text.num_layers} layers and the lm_head in one graph "
                f"({precision})"
            )
            if PREFILLS[prefill]:
                files["prompt_decoder"] = "prompt_decoder.onnx"
                save_model(
                    build_decoder(ck, spec, build, PREFILLS[prefill]),
                    staging / files["prompt_decoder"],
                )
                log(
                    f"prompt_decoder.onnx: the same for prompts ({prefill} per output channel, "
                    "rows quantised as "
                    "they run)"
                )
        else:
            layers: list = []
            for i in range(spec.text.num_layers):
                if contract == "dynamic":
                    layers.append(f"layer_{i}.onnx")
                    save_model(build_layer(ck, spec, i, quant=quant), staging / layers[-1])
                    continue
                layers.append([f"layer_{i}_g{j}.onnx" for j in range(len(layer_groups(build)))])
                for name, group in zip(layers[-1], layer_groups(build)):
                    save_model(build_layer(ck, spec, i, group), staging / name)
            log(
                f"{spec.text.num_layers} decoder layers"
                + (
                    f", {len(layer_groups(build))} shape groups each"
                    if contract == "axmodel"
                    else ""
                )
            )
            files |= {"post": "post.onnx", "layers": layers}
            save_model(
                build_post(ck, spec, 1 if contract == "axmodel" else "tokens", quant),
                staging / "post.onnx",
            )
        table = ck.get("language_model.model.embed_tokens.weight")
        if contract == "axmodel":
            files["embeddings"] = "model.embed_tokens.weight.bfloat16.bin"
            save_embeddings_bf16(table, staging / files["embeddings"])
        else:
            np.save(staging / files["embeddings"], table)
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, staging / name)
        source = {
            "hf_model": str(hf_dir.resolve()),
            "sha256": ck.sha256(),
            "contract": contract,
            "precision": precision,
            "vit_precision": vit_precision,
            "prefill": prefill,
        }
        if quant:
            source |= {
                "block_size": block_size,
                "gate_up_block_size": gate_up_block_size,
                "accuracy_level": accuracy_level,
            }
        manifest = Manifest(spec=spec, build=build, files=files, source=source)
        manifest.write(staging)
        for path in sorted(
            staging.iterdir(), key=lambda p: p.name == MANIFEST
        ):  # the manifest last
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"exported {hf_dir} -> {out_dir} in {time.perf_counter() - started:.1f} s")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn an original InternVL2.5 checkpoint (safetensors in the OpenGVLab layout) "
        "into the\n"
        "model directory the engine runs: the ViT, the decoder (one graph, or one model per "
        "layer),\n"
        "the embedding table, the tokenizer and a manifest. No torch is needed.",
        epilog="Examples:\n"
        "  internvl-export --hf-model InternVL2_5-1B-MPO --out model\n"
        "  internvl-export --hf-model InternVL2_5-1B-MPO --out model-int4 --precision int4\n"
        "  internvl-export --hf-model ckpt --out contract --contract axmodel   # the board's shape "
        "groups",
    )
    ap.add_argument(
        "--hf-model", "--hf_model", required=True, type=Path, help="original InternVL2.5 checkpoint"
    )
    ap.add_argument("--out", required=True, type=Path, help="directory to write the models to")
    d = LayerBuild()
    ap.add_argument(
        "--prefill-chunk", type=int, default=d.prefill_chunk, help="tokens per prefill run"
    )
    ap.add_argument("--kv-cache-len", type=int, default=d.kv_cache_len, help="KV cache rows")
    ap.add_argument(
        "--max-prompt-tokens", type=int, default=d.max_prompt_tokens, help="longest accepted prompt"
    )
    ap.add_argument(
        "--contract",
        choices=CONTRACTS,
        help="fused: the whole decoder in one graph (default; the fastest on a CPU, needs "
        "onnxruntime "
        ">= 1.20, dynamic is the default under an older one); dynamic: one model per layer; "
        "axmodel: one model per fixed-shape group, as Pulsar2 llm_build compiles them (checks the "
        "board's driving logic on a CPU)",
    )
    ap.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="decoder weights: fp32 (default), int8 or int4, block-wise (check with "
        "internvl-fidelity)",
    )
    ap.add_argument(
        "--block-size",
        type=int,
        help="int8/int4: weights per scale and zero point (default "
        + ", ".join(
            f"{size} for {p}"
            + (
                f" with {DEFAULT_GATE_UP_BLOCK_SIZE[p]} in the MLP's gate and up projections"
                if p in DEFAULT_GATE_UP_BLOCK_SIZE
                else ""
            )
            for p, size in DEFAULT_BLOCK_SIZE.items()
        )
        + ")",
    )
    ap.add_argument(
        "--gate-up-block-size",
        type=int,
        help="int8/int4: the same for the MLP's gate and up projections (default: --block-size; "
        "without --block-size the precision's default)",
    )
    ap.add_argument(
        "--vit-precision",
        choices=VIT_PRECISIONS,
        help="ViT weights: int8 (default with --precision int8 or int4: 0.6 of the time per tile) "
        "or "
        "fp32 (default otherwise)",
    )
    ap.add_argument(
        "--accuracy-level",
        type=int,
        choices=(0, 1, 2, 3, 4),
        default=4,
        help="int8/int4: MatMulNBits' compute type; 4 (default) multiplies in int8, 0 in float",
    )
    ap.add_argument(
        "--prefill",
        choices=PREFILLS,
        help="fused decoder: how prompts are multiplied: same (as decode steps; default for fp32 "
        "and "
        "int4) or int8 (a second graph, prompt_decoder.onnx, int8 per output channel with rows "
        "quantised as they run; default for int8: 0.61 of the prefill time for 0.85 GB more "
        "memory at 1B's size)",
    )
    args = ap.parse_args(argv)
    exit_on_sigterm()
    try:
        export(
            args.hf_model,
            args.out,
            LayerBuild(args.prefill_chunk, args.kv_cache_len, args.max_prompt_tokens),
            args.contract,
            args.precision,
            args.block_size,
            args.accuracy_level,
            args.vit_precision,
            args.prefill,
            args.gate_up_block_size,
        )
    except InternVLError as e:
        print(f"internvl-export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable or full --out
        print(f"internvl-export: error: cannot write the model directory: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
