"""Writing ONNX graphs with ``onnx.helper``: the builder, the weight quantisations its linear layers
take, and the decoder layouts a model family's layer is written into (``models/``: the layer calls
``add_norm``, ``linear``, ``attention``, ``swiglu`` and ``rows_for_logits`` on one of them):

- ``ContractLayer`` / ``ContractPost``: the AX650N per-layer contract: ``K_cache``, ``V_cache``
  [1, C, kv_dim], ``indices`` [1, T] (uint32 absolute positions), ``input`` [1, T, H], ``mask``
  [1, T, C + T] (additive) -> new K rows (after RoPE), new V rows [1, T, kv_dim], ``output``
  [1, T, H]; and ``input`` [1, T, H] -> ``output`` [1, T, vocab]. Dynamic shapes, or one Pulsar2
  shape group (C, T).
- ``FusedDecoder``: every layer and the lm_head in one graph (the CPU's): ``inputs_embeds``
  [1, T, H],
  ``seqlens_k`` (int32 [1], the last position), ``total_sequence_length`` and per layer
  ``past_key_{i}``/``past_value_{i}`` [1, kv_heads, M, head_dim] -> ``logits`` of the last row
  [1, 1, vocab] and ``present_key_{i}``/``present_value_{i}``. onnxruntime's GroupQueryAttention
  (rotary inside) reads and writes the cache in place when past and present are bound to one buffer
  and takes Q/K/V packed as one matmul makes them; SkipSimplifiedLayerNormalization fuses each
  residual add with its RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by older onnxruntime releases on boards
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
    blocks of 128); for one row it is slower than MatMulNBits (docs/benchmarks.md).

    In the ViT the weights' rounding is most of what int8 costs: the features of a random tile are
    at cosine 0.99979 to fp32's with int8 weights and fp32 activations, 0.99973 with both (real
    dimensions, random weights). Finer weights would need blocks, which this GEMM does not take."""


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


class Graph:
    """Just enough of a graph builder: named values are strings, constants become initializers.
    ``linear`` layers keep their weights as ``quant`` says (None: fp32; ``Quantization``: block-wise
    for MatMulNBits; ``RowInt8``)."""

    def __init__(
        self,
        name: str,
        quant: Quantization | RowInt8 | None = None,
        fused_attention: bool = False,
    ):
        self.name, self.quant, self.fused_attention = name, quant, fused_attention
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
        self,
        x: str,
        weight: np.ndarray,
        bias: np.ndarray | None = None,
        gate_up: bool = False,
        normed: bool = False,
        fp32: bool = False,
        floor: float | None = None,
    ) -> str:
        """x @ weight.T (+ bias); weight [out, in] as the checkpoint stores it. ``gate_up``: the
        MLP's gate and up projections, in blocks of ``Quantization.gate_up_block_size`` where it is
        set. ``normed``: ``x`` comes straight from a LayerNorm, its rows of one magnitude (see
        ``_normed_int8_matmul``). ``fp32``: fp32 weights whatever ``quant`` says. ``floor``: no
        value of ``x`` is below it (``internvit.GELU_MINIMUM``), which spares ``RowInt8`` a pass."""
        if self.quant is None or fp32:
            y = self.op("MatMul", x, self.const(np.ascontiguousarray(weight.T), "w"))
        elif isinstance(self.quant, RowInt8) and normed:
            return self._normed_int8_matmul(x, weight, bias)
        elif isinstance(self.quant, RowInt8):
            y = self._row_int8_matmul(x, weight, floor)
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
            # added inside the kernel (inputs 4 and 5: no g_idx, then the bias)
            if bias is not None:
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

    def _row_int8_matmul(self, x: str, weight: np.ndarray, floor: float | None = None) -> str:
        """``RowInt8``: x [..., K] -> uint8 rows (zero point 128, scale max|row| / 127) ->
        MatMulIntegerToFloat (the int8 GEMM, the channel scales applied as it writes the floats) ->
        times each row's scale.

        max|row| comes from the row's maximum and minimum, not from Abs (which writes the rows
        out once more): for the ViT's rows this took 0.13 against 0.25 ms (1025 x 1024, two
        threads, as VNNI). With ``floor`` the maximum alone bounds it, max(max, -floor): a GELU's
        4096-wide rows then take 0.32 ms, not 0.94, and no value is clipped. QuantizeLinear
        with a scale per row takes twice the time of one scale's (0.94 against 0.43 ms for those
        rows); opset 21's blocked form takes 0.46 ms, 14 ms a tile, but these graphs keep opset 17
        for older onnxruntime releases."""
        n, k = weight.shape
        values, channel_scales = quantize_channels(weight)
        peak = self.op("ReduceMax", x, axes=[-1], keepdims=1)
        low = (
            self.const(np.float32(-floor), "neg_floor")
            if floor is not None
            else self.op("Neg", self.op("ReduceMin", x, axes=[-1], keepdims=1))
        )
        peak = self.op("Max", peak, low)
        # an all-zero row
        row_scales = self.op(
            "Max",
            self.op("Mul", peak, self.const(np.float32(1 / 127), "inv127")),
            self.const(np.float32(np.finfo(np.float32).tiny), "tiny"),
        )
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

    def linear_parts(
        self, x: str, weight: np.ndarray, bias: np.ndarray, parts: int, normed: bool = False
    ) -> list[str]:
        """``linear`` of a weight that stacks ``parts`` matrices of one size (InternViT's q, k and
        v), its products apart. With ``RowInt8`` and ``normed`` the rows are quantised once and
        each part multiplied on its own, which spares the copy a Split of one product makes (16 ms
        of a 1075 ms tile, as VNNI)."""
        if isinstance(self.quant, RowInt8) and normed:
            quantized = self.op("DynamicQuantizeLinear", x, outputs=3)
            return [
                self._int8_gemm(quantized, w, b)
                for w, b in zip(np.split(weight, parts), np.split(bias, parts))
            ]
        return self.op("Split", self.linear(x, weight, bias, normed=normed), axis=-1, outputs=parts)

    def _normed_int8_matmul(self, x: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        """``RowInt8`` for rows a LayerNorm has just made: one scale and zero point for them all
        (DynamicQuantizeLinear), and the bias added in the GEMM's output pass, which onnxruntime
        fuses into one DynamicQuantizeMatMul. A row scale buys nothing where every row has the same
        spread, and its passes over the rows (the peak, the quantisation, the scaling after) took
        a quarter of the int8 ViT's time: without them here a 448 px tile took 0.86 of it (869
        against 1006 ms, AMX)."""
        return self._int8_gemm(self.op("DynamicQuantizeLinear", x, outputs=3), weight, bias)

    def _int8_gemm(self, quantized: list[str], weight: np.ndarray, bias: np.ndarray | None) -> str:
        """DynamicQuantizeLinear's (rows, scale, zero point) times ``weight`` in int8, + bias."""
        values, channel_scales = quantize_channels(weight)
        rows, scale, zero = quantized
        inputs = [rows, self.const(values, "wq"), scale, self.const(channel_scales, "ws"), zero]
        if bias is not None:
            inputs += ["", self.const(bias, "b")]  # no weight zero point: symmetric
        return self.op("MatMulIntegerToFloat", *inputs, domain=MS)

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

    # What the image encoder's layers call (models/internvit.py, models/internvl.py).
    def add(self, x: str, y: str | np.ndarray) -> str:
        return self.op("Add", x, y if isinstance(y, str) else self.const(y, "add"))

    def patch_embed(self, image: str, weight: np.ndarray, bias: np.ndarray, patch: int) -> str:
        """[1, 3, S, S] -> [1, (S / patch)^2, d]: a strided convolution, patches in row order."""
        x = self.op(
            "Conv",
            image,
            self.const(weight),
            self.const(bias),
            kernel_shape=[patch, patch],
            strides=[patch, patch],
        )
        return self.op("Transpose", self.reshape(x, [1, weight.shape[0], -1]), perm=[0, 2, 1])

    def prepend(self, row: np.ndarray, x: str) -> str:
        return self.op("Concat", self.const(row), x, axis=1)

    def self_attention(self, q: str, k: str, v: str, heads: int, head_dim: int) -> str:
        """Bidirectional multi-head attention of [1, N, d] q, k, v rows -> [1, N, d]; with
        ``fused_attention``, onnxruntime's MultiHeadAttention kernel (no transposes, scores and
        softmax per head in its own buffers). q, k and v come apart (``linear_parts``): onnxruntime
        1.32's CPU kernel refuses them packed ("not implemented for CPU"). Both
        products in int8 (as OpenVINO's NNCF int8 has them), through MatMulInteger with q, k, v
        and the probabilities quantised at run time, are slower, since the scores then go through
        memory: 24.9 ms a layer against the kernel's 15.3 ms (1025 tokens, 16 heads, two threads,
        as VNNI; 30.7 against 23.8 as AVX2), at cosine 0.990 to its output."""
        if self.fused_attention:
            return self.op("MultiHeadAttention", q, k, v, domain=MS, num_heads=heads)
        q = self.op("Transpose", self.reshape(q, [1, 0, heads, head_dim]), perm=[0, 2, 1, 3])
        k = self.op("Transpose", self.reshape(k, [1, 0, heads, head_dim]), perm=[0, 2, 3, 1])
        v = self.op("Transpose", self.reshape(v, [1, 0, heads, head_dim]), perm=[0, 2, 1, 3])
        scores = self.op(
            "Mul", self.op("MatMul", q, k), self.const(np.float32(head_dim**-0.5), "scale")
        )
        a = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        return self.reshape(self.op("Transpose", a, perm=[0, 2, 1, 3]), [1, 0, heads * head_dim])

    def drop_first_row(self, x: str, rows: int) -> str:
        """Rows 1 .. rows of [1, 1 + rows, d] (the class token dropped)."""
        return self.op(
            "Slice",
            x,
            self.const(np.array([1], np.int64)),
            self.const(np.array([rows + 1], np.int64)),
            self.const(np.array([1], np.int64)),
        )

    def pixel_shuffle(self, x: str, side: int, r: int) -> str:
        """InternVL's pixel shuffle (ps_version v2) of a [1, side * side, d] patch grid: each r x r
        square of patches becomes one token of r * r * d features."""
        x = self.op("Transpose", self.reshape(x, [1, side, side // r, -1]), perm=[0, 2, 1, 3])
        x = self.op("Transpose", self.reshape(x, [1, side // r, side // r, -1]), perm=[0, 2, 1, 3])
        return self.reshape(x, [1, (side // r) ** 2, -1])

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == MS for n in self.nodes):
            opsets.append(helper.make_opsetid(MS, 1))
        m = helper.make_model(graph, opset_imports=opsets, producer_name="internvl-export")
        m.ir_version = IR_VERSION
        return m


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


def rope_angles(positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    return positions.astype(np.float64)[:, None] * inv_freq[None]


class ContractLayer(Graph):
    """One decoder layer driven with an explicit KV cache (the "together" model contract), as a
    model family's ``layer`` writes it. ``group``: (C, T) of one fixed-shape group; the no-history
    group (C = 0) takes the contract's dummy [1, 1, H] K/V inputs and does not read them."""

    def __init__(
        self,
        name: str,
        text,
        inv_freq: np.ndarray,
        group: tuple[int, int] | None = None,
        quant: Quantization | None = None,
    ):
        super().__init__(name, quant)
        self.text, self.inv_freq = text, inv_freq
        capacity, tokens = group if group else ("history", "tokens")
        self.capacity = capacity
        history_shape = [1, 1, text.hidden_size] if capacity == 0 else [1, capacity, text.kv_dim]
        self.k_cache = self.input("K_cache", np.float32, history_shape)
        self.v_cache = self.input("V_cache", np.float32, history_shape)
        self.indices = self.input("indices", np.uint32, [1, tokens])
        self.rows = self.input("input", np.float32, [1, tokens, text.hidden_size])
        self.mask = self.input(
            "mask", np.float32, [1, tokens, capacity + tokens if group else "total"]
        )
        self.tokens = tokens

    def add_norm(
        self, pending: str | None, stream: str, weight: np.ndarray, eps: float
    ) -> tuple[str, str]:
        stream = stream if pending is None else self.op("Add", stream, pending)
        return self.rms_norm(stream, weight, eps), stream

    def swiglu(self, gate_up: str, width: int) -> str:
        gate, up = self.op(
            "Split", gate_up, self.const(np.array([width, width], np.int64)), axis=-1, outputs=2
        )
        return self.op("Mul", self.op("Mul", gate, self.op("Sigmoid", gate)), up)

    def rows_for_logits(self, h: str) -> str:
        return h

    def attention(self, qkv: str, layer: int, t) -> str:
        """RoPE (rotate-half) at the ``indices`` positions, the new rows after the cached ones, the
        additive mask; grouped-query attention without repeating K/V. The new K (after RoPE) and V
        rows are outputs."""
        hsz, nh, nkv, hd = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim
        q, k, v_new = self.op(
            "Split",
            qkv,
            self.const(np.array([hsz, t.kv_dim, t.kv_dim], np.int64)),
            axis=-1,
            outputs=3,
        )
        freqs = self.op(
            "Mul",
            self.op(
                "Unsqueeze",
                self.op("Cast", self.indices, to=TensorProto.FLOAT),
                self.const(np.array([-1], np.int64)),
            ),
            self.const(self.inv_freq, "inv_freq"),
        )
        angles = self.op(
            "Unsqueeze",
            self.op("Concat", freqs, freqs, axis=-1),
            self.const(np.array([2], np.int64)),
        )
        cos, sin = self.op("Cos", angles), self.op("Sin", angles)
        halves = self.const(np.array([hd // 2, hd // 2], np.int64))

        def rope(y):
            first, second = self.op("Split", y, halves, axis=-1, outputs=2)
            rotated = self.op("Concat", self.op("Neg", second), first, axis=-1)
            return self.op("Add", self.op("Mul", y, cos), self.op("Mul", rotated, sin))

        q = rope(self.reshape(q, [0, 0, nh, hd]))
        k_new = self.reshape(rope(self.reshape(k, [0, 0, nkv, hd])), [0, 0, t.kv_dim])
        if self.capacity == 0:
            all_k, all_v = k_new, v_new
        else:
            all_k, all_v = (
                self.op("Concat", self.k_cache, k_new, axis=1),
                self.op("Concat", self.v_cache, v_new, axis=1),
            )
        keys = self.op("Transpose", self.reshape(all_k, [0, 0, nkv, hd]), perm=[0, 2, 3, 1])
        values = self.op("Transpose", self.reshape(all_v, [0, 0, nkv, hd]), perm=[0, 2, 1, 3])
        # The query heads of one KV head stacked along rows: [1, nkv, group * T, hd].
        q = self.reshape(self.op("Transpose", q, perm=[0, 2, 1, 3]), [1, nkv, -1, hd])
        scores = self.op(
            "Mul", self.op("MatMul", q, keys), self.const(np.float32(hd**-0.5), "scale")
        )
        group_mask = self.op(
            "Unsqueeze",
            self.op("Concat", *([self.mask] * (nh // nkv)), axis=1),
            self.const(np.array([1], np.int64)),
        )
        probs = self.op("Softmax", self.op("Add", scores, group_mask), axis=-1)
        a = self.reshape(self.op("MatMul", probs, values), [1, nh, -1, hd])
        self.output(k_new, "K", np.float32, [1, self.tokens, t.kv_dim])
        self.output(v_new, "V", np.float32, [1, self.tokens, t.kv_dim])
        return self.reshape(self.op("Transpose", a, perm=[0, 2, 1, 3]), [0, 0, hsz])

    def finish(self, stream: str, pending: str) -> onnx.ModelProto:
        self.output(
            self.op("Add", stream, pending),
            "output",
            np.float32,
            [1, self.tokens, self.text.hidden_size],
        )
        return self.model()


class ContractPost(Graph):
    """The contract's post model: ``input`` [1, T, H] -> ``output`` [1, T, vocab] (final norm,
    lm_head)."""

    add_norm, rows_for_logits = ContractLayer.add_norm, ContractLayer.rows_for_logits

    def __init__(self, text, tokens: int | str = "tokens", quant: Quantization | None = None):
        super().__init__("qwen2_post", quant)
        self.text, self.tokens = text, tokens
        self.rows = self.input("input", np.float32, [1, tokens, text.hidden_size])

    def finish(self, logits: str) -> onnx.ModelProto:
        self.output(logits, "output", np.float32, [1, self.tokens, self.text.vocab_size])
        return self.model()


class FusedDecoder(Graph):
    """Every decoder layer and the lm_head as one graph; the KV cache read and written in place by
    GroupQueryAttention. Only the last row's logits are computed: a prompt needs no others."""

    def __init__(
        self,
        text,
        cache_len: int,
        inv_freq: np.ndarray,
        quant: Quantization | RowInt8 | None = None,
    ):
        super().__init__("qwen2_decoder", quant)
        self.text = text
        self.cache = [1, text.num_kv_heads, cache_len, text.head_dim]
        self.rows = self.input("inputs_embeds", np.float32, [1, "tokens", text.hidden_size])
        self.seqlens = self.input("seqlens_k", np.int32, [1])
        self.total = self.input("total_sequence_length", np.int32, [])
        angles = rope_angles(np.arange(cache_len), inv_freq)
        self.cos = self.const(np.cos(angles).astype(np.float32), "cos")
        self.sin = self.const(np.sin(angles).astype(np.float32), "sin")

    def add_norm(
        self, pending: str | None, stream: str, weight: np.ndarray, eps: float
    ) -> tuple[str, str]:
        """The residual add fused with the RMSNorm after it."""
        if pending is None:
            return self.op(
                "SimplifiedLayerNormalization",
                stream,
                self.const(weight, "ln"),
                axis=-1,
                epsilon=eps,
            ), stream
        h, _, _, stream = self.op(
            "SkipSimplifiedLayerNormalization",
            pending,
            stream,
            self.const(weight, "ln"),
            outputs=4,
            domain=MS,
            epsilon=eps,
        )
        return h, stream

    swiglu = ContractLayer.swiglu

    def rows_for_logits(self, h: str) -> str:
        return self.op(
            "Slice",
            h,
            self.const(np.array([-1], np.int64)),
            self.const(np.array([2**31 - 1], np.int64)),
            self.const(np.array([1], np.int64)),
        )

    def attention(self, qkv: str, layer: int, t) -> str:
        for kind in ("key", "value"):
            self.input(f"past_{kind}_{layer}", np.float32, self.cache)
        attention, *_ = self.op(
            "GroupQueryAttention",
            qkv,
            "",
            "",
            f"past_key_{layer}",
            f"past_value_{layer}",
            self.seqlens,
            self.total,
            self.cos,
            self.sin,
            outputs=[self._fresh("gqa"), f"present_key_{layer}", f"present_value_{layer}"],
            domain=MS,
            num_heads=t.num_heads,
            kv_num_heads=t.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
        for kind in ("key", "value"):
            self.output(
                f"present_{kind}_{layer}", f"present_{kind}_{layer}", np.float32, self.cache
            )
        return attention

    def finish(self, logits: str) -> onnx.ModelProto:
        self.output(logits, "logits", np.float32, [1, 1, self.text.vocab_size])
        self.outputs.insert(0, self.outputs.pop())  # logits first
        return self.model()
