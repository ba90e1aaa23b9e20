"""Qwen2, InternVL2.5's language model (Qwen2.5-0.5B in InternVL2.5-1B): its arguments, the
weights of its checkpoint, and its decoder layer, written once.

The layer is a list of operations on an ``ops`` object; each graph layout the exporter writes is an
``ops`` of its own (``tools/graph.py``): the AX650N per-layer contract (RoPE, the KV cache and the
mask explicit) and the CPU's fused decoder (GroupQueryAttention and fused residual norms). Neither
this file nor the runtime imports them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ModelDirError
from .common import Weight, check_fields

MODEL_TYPE = "qwen2"
# Inside InternVL's checkpoint the causal LM's weights sit under this prefix.
PREFIX = "language_model."


@dataclass(frozen=True)
class Qwen2Args:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    def __post_init__(self):
        check_fields(self, "spec.text")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, t: dict) -> "Qwen2Args":
        """From config.json's ``llm_config`` (transformers' Qwen2Config)."""
        heads = int(t["num_attention_heads"])
        return cls(
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_layers=int(t["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(t.get("num_key_value_heads", heads)),
            head_dim=int(t.get("head_dim") or t["hidden_size"] // heads),
            vocab_size=int(t["vocab_size"]),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=float(t.get("rope_theta", 1e6)),
            tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        )


EMBED_TOKENS = f"{PREFIX}model.embed_tokens.weight"
NORM = f"{PREFIX}model.norm.weight"
LM_HEAD = f"{PREFIX}lm_head.weight"


LAYERS = f"{PREFIX}model.layers."


def layer_key(i: int, name: str) -> str:
    return f"{LAYERS}{i}.{name}"


def expand_layers(weights: dict, layers: int, after: list[int]) -> dict:
    """Block expansion (LLaMA Pro, Wu et al. 2024): a checkpoint's ``weights`` (original layout, a
    decoder of ``layers`` layers) with a copy of each layer in ``after`` behind it, renumbered. The
    copy's two output projections, the only paths from a layer into the residual stream, are zero,
    so the grown model computes exactly what the original did."""
    grown = {k: v for k, v in weights.items() if not k.startswith(LAYERS)}
    order = [i for i in range(layers) for _ in range(1 + (i in after))]
    for new_index, i in enumerate(order):
        copy = new_index > 0 and order[new_index - 1] == i
        for key, value in weights.items():
            if key.startswith(layer_key(i, "")):
                name = key[len(layer_key(i, "")) :]
                zeroed = copy and name in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
                grown[layer_key(new_index, name)] = np.zeros_like(value) if zeroed else value
    return grown


def weights(t: Qwen2Args) -> list[Weight]:
    """The checkpoint's tensors, in its order: names, shapes and what kind of values they hold."""
    h, kv, ffn = t.hidden_size, t.kv_dim, t.intermediate_size
    out = [Weight(EMBED_TOKENS, (t.vocab_size, h), "embed")]
    for i in range(t.num_layers):
        out += [
            Weight(layer_key(i, name), shape, kind)
            for name, shape, kind in (
                ("input_layernorm.weight", (h,), "norm"),
                ("self_attn.q_proj.weight", (h, h), "linear"),
                ("self_attn.q_proj.bias", (h,), "bias"),
                ("self_attn.k_proj.weight", (kv, h), "linear"),
                ("self_attn.k_proj.bias", (kv,), "bias"),
                ("self_attn.v_proj.weight", (kv, h), "linear"),
                ("self_attn.v_proj.bias", (kv,), "bias"),
                ("self_attn.o_proj.weight", (h, h), "linear"),
                ("post_attention_layernorm.weight", (h,), "norm"),
                ("mlp.gate_proj.weight", (ffn, h), "linear"),
                ("mlp.up_proj.weight", (ffn, h), "linear"),
                ("mlp.down_proj.weight", (h, ffn), "linear"),
            )
        ]
    return out + [Weight(NORM, (h,), "norm"), Weight(LM_HEAD, (t.vocab_size, h), "linear")]


def lm_head(
    get: Callable[[str], np.ndarray], has: Callable[[str], bool], t: Qwen2Args
) -> np.ndarray:
    if has(LM_HEAD):
        return get(LM_HEAD)
    if t.tie_word_embeddings:
        return get(EMBED_TOKENS)
    raise ModelDirError(f"checkpoint lacks {LM_HEAD} and its embeddings are not tied")


def layer(
    ops, stream: str, pending: str | None, i: int, get: Callable[[str], np.ndarray], t: Qwen2Args
):
    """Decoder layer ``i`` on the residual ``stream``, whose last addend ``pending`` (None: none)
    each layout adds where it fuses best. Returns the new stream and the addend left pending (the
    MLP's output)."""
    w = lambda name: get(layer_key(i, name))  # noqa: E731
    h, stream = ops.add_norm(pending, stream, w("input_layernorm.weight"), t.rms_norm_eps)
    qkv = ops.linear(
        h,
        np.concatenate([w(f"self_attn.{n}_proj.weight") for n in "qkv"]),
        np.concatenate([w(f"self_attn.{n}_proj.bias") for n in "qkv"]),
    )
    attention = ops.attention(qkv, i, t)  # rotary positions and the KV cache: the layout's own
    h, stream = ops.add_norm(
        ops.linear(attention, w("self_attn.o_proj.weight")),
        stream,
        w("post_attention_layernorm.weight"),
        t.rms_norm_eps,
    )
    gate_up = ops.linear(
        h, np.concatenate([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")]), gate_up=True
    )
    return stream, ops.linear(ops.swiglu(gate_up, t.intermediate_size), w("mlp.down_proj.weight"))


def head(ops, stream: str, pending: str | None, get, has, t: Qwen2Args) -> str:
    """The final norm and the lm_head, on the rows the layout keeps (the fused decoder: the
    last)."""
    h, _ = ops.add_norm(pending, stream, get(NORM), t.rms_norm_eps)
    return ops.linear(ops.rows_for_logits(h), lm_head(get, has, t))


def rope_inv_freq(t: Qwen2Args) -> np.ndarray:
    return (
        1.0 / t.rope_theta ** (np.arange(0, t.head_dim, 2, dtype=np.float64) / t.head_dim)
    ).astype(np.float32)


Args = Qwen2Args

# transformers' InternVLForConditionalGeneration keeps the same weights under these names.
TRANSFORMERS_NAMES = [
    (rf"^{re.escape(PREFIX)}model\.", "model.language_model."),
    (rf"^{re.escape(PREFIX)}lm_head\.", "lm_head."),
]
