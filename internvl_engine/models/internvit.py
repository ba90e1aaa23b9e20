"""InternViT, InternVL2.5's image encoder (InternViT-300M in InternVL2.5-1B): its arguments, the
weights of its checkpoint, and its layers, written once as operations on an ``ops`` object (the
exporter's graph builder, ``tools/graph.py``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .common import Weight, check_fields

# Below the exact GELU's least value, x * Phi(x) = -0.169971 at x = -0.7518: no output of the MLP's
# GELU is below it, so the int8 fc2 can bound its rows by their maximum alone.
GELU_MINIMUM = -0.17

MODEL_TYPE = "intern_vit_6b"  # config.json's vision_config.model_type for every InternViT size
PREFIX = "vision_model."
EMBEDDINGS = f"{PREFIX}embeddings."


@dataclass(frozen=True)
class InternViTArgs:
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    norm_type: str = field(metadata={"choices": ("layer_norm", "rms_norm")})
    qkv_bias: bool
    qk_normalization: bool

    def __post_init__(self):
        check_fields(self, "spec.vision")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, v: dict, image_size: int) -> "InternViTArgs":
        """From config.json's ``vision_config``; the tile size is InternVL's
        ``force_image_size``."""
        return cls(
            image_size=image_size,
            patch_size=int(v["patch_size"]),
            hidden_size=int(v["hidden_size"]),
            num_layers=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]),
            intermediate_size=int(v["intermediate_size"]),
            layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            norm_type=v.get("norm_type", "layer_norm"),
            qkv_bias=bool(v.get("qkv_bias", True)),
            qk_normalization=bool(v.get("qk_normalization", False)),
        )

    def supported(self) -> str | None:
        """Why the exporter cannot write this encoder, or None."""
        if self.qk_normalization or self.norm_type != "layer_norm":
            return (
                "vision encoders with qk_normalization or rms_norm are not supported "
                "(InternVL2.5-1B's "
                "InternViT-300M uses neither)"
            )
        return None


def layer_key(i: int, name: str) -> str:
    return f"{PREFIX}encoder.layers.{i}.{name}"


def qkv_key(i: int, kind: str) -> str:
    """Layer ``i``'s fused q, k, v projection: its ``weight`` or ``bias``."""
    return layer_key(i, f"attn.qkv.{kind}")


def weights(v: InternViTArgs) -> list[Weight]:
    """The checkpoint's tensors, in its order. The patch embedding is drawn like an embedding and
    scaled by its fan-in ("patch")."""
    d, p, ffn = v.hidden_size, v.patch_size, v.intermediate_size
    out = [
        Weight(f"{EMBEDDINGS}class_embedding", (1, 1, d), "embed"),
        Weight(f"{EMBEDDINGS}patch_embedding.weight", (d, 3, p, p), "patch"),
        Weight(f"{EMBEDDINGS}patch_embedding.bias", (d,), "bias"),
        Weight(f"{EMBEDDINGS}position_embedding", (1, v.patches_per_side**2 + 1, d), "embed"),
    ]
    for i in range(v.num_layers):
        qkv = [("attn.qkv.weight", (3 * d, d), "linear")] + (
            [("attn.qkv.bias", (3 * d,), "bias")] if v.qkv_bias else []
        )
        out += [
            Weight(layer_key(i, name), shape, kind)
            for name, shape, kind in (
                ("norm1.weight", (d,), "norm"),
                ("norm1.bias", (d,), "bias"),
                *qkv,
                ("attn.proj.weight", (d, d), "linear"),
                ("attn.proj.bias", (d,), "bias"),
                ("ls1", (d,), "scale"),
                ("norm2.weight", (d,), "norm"),
                ("norm2.bias", (d,), "bias"),
                ("mlp.fc1.weight", (ffn, d), "linear"),
                ("mlp.fc1.bias", (ffn,), "bias"),
                ("mlp.fc2.weight", (d, ffn), "linear"),
                ("mlp.fc2.bias", (d,), "bias"),
                ("ls2", (d,), "scale"),
            )
        ]
    return out


def embed(ops, image: str, get: Callable[[str], np.ndarray], v: InternViTArgs) -> str:
    """[1, 3, S, S] pixels -> [1, 1 + patches, d]: patch embedding, the class token first, positions
    added."""
    x = ops.patch_embed(
        image,
        get(f"{EMBEDDINGS}patch_embedding.weight"),
        get(f"{EMBEDDINGS}patch_embedding.bias"),
        v.patch_size,
    )
    return ops.add(
        ops.prepend(get(f"{EMBEDDINGS}class_embedding"), x), get(f"{EMBEDDINGS}position_embedding")
    )


def layer(ops, x: str, i: int, get: Callable[[str], np.ndarray], v: InternViTArgs) -> str:
    w = lambda name: get(layer_key(i, name))  # noqa: E731
    h = ops.layer_norm(x, w("norm1.weight"), w("norm1.bias"), v.layer_norm_eps)
    bias = w("attn.qkv.bias") if v.qkv_bias else np.zeros(3 * v.hidden_size, np.float32)
    attention = ops.self_attention(
        *ops.linear_parts(h, w("attn.qkv.weight"), bias, 3, normed=True),
        v.num_heads,
        v.hidden_size // v.num_heads,
    )
    # The layer scales (ls1, ls2) scale output channels: folded into the projections before them,
    # they cost no pass over the rows (and an int8 projection's channel scales carry them).
    ls1, ls2 = w("ls1"), w("ls2")
    x = ops.add(
        x,
        ops.linear(attention, w("attn.proj.weight") * ls1[:, None], w("attn.proj.bias") * ls1),
    )
    h = ops.layer_norm(x, w("norm2.weight"), w("norm2.bias"), v.layer_norm_eps)
    h = ops.linear(
        ops.gelu(ops.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias"), normed=True)),
        w("mlp.fc2.weight") * ls2[:, None],
        w("mlp.fc2.bias") * ls2,
        floor=GELU_MINIMUM,
    )
    return ops.add(x, h)


def encoder(ops, image: str, get, v: InternViTArgs) -> str:
    """The last layer's output, class token first."""
    x = embed(ops, image, get, v)
    for i in range(v.num_layers):
        x = layer(ops, x, i, get, v)
    return x


# transformers' InternVLForConditionalGeneration keeps these weights under other names; its vision
# attention has the qkv matrix in three (q_proj, k_proj, v_proj).
QKV = re.compile(rf"^{re.escape(PREFIX)}encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")
TRANSFORMERS_QKV = "model.vision_tower.encoder.layer.{layer}.attention.{part}_proj.{kind}"
TRANSFORMERS_Q = re.compile(
    r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.q_proj\.(weight|bias)$"
)
TRANSFORMERS_KV = re.compile(r"^model\.vision_tower\.encoder\.layer\.\d+\.attention\.[kv]_proj\.")
TRANSFORMERS_NAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (
        r"^vision_model\.embeddings\.position_embedding$",
        "model.vision_tower.embeddings.position_embeddings",
    ),
    (
        r"^vision_model\.embeddings\.patch_embedding\.",
        "model.vision_tower.embeddings.patch_embeddings.projection.",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.",
        r"model.vision_tower.encoder.layer.\1.attention.projection_layer.",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.ls1$",
        r"model.vision_tower.encoder.layer.\1.lambda_1",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.ls2$",
        r"model.vision_tower.encoder.layer.\1.lambda_2",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.",
        r"model.vision_tower.encoder.layer.\1.layernorm_before.",
    ),
    (
        r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.",
        r"model.vision_tower.encoder.layer.\1.layernorm_after.",
    ),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
]
