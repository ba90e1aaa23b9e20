"""InternVL2.5: an InternViT, a projector (InternVL's pixel shuffle, then ``mlp1``), and a language
model, whose family its config.json names (``llm_config.model_type``). A new language model family
is a file beside ``qwen2.py`` with the same names (``MODEL_TYPE``, its args' ``from_config``,
``weights``, ``layer``, ``head``, ``TRANSFORMERS_NAMES``), listed in ``LANGUAGE_MODELS``, plus its
chat template in ``prompt.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import internvit, qwen2
from .common import Weight

LANGUAGE_MODELS = {qwen2.MODEL_TYPE: qwen2}
PROJECTOR = "mlp1."
PROJECTOR_NORM_EPS = 1e-5  # mlp1.0 is torch's nn.LayerNorm with its default eps


def language_model(model_type: str):
    """The family file of a language model type; KeyError for one without a file here."""
    return LANGUAGE_MODELS[model_type]


def projector_width(vision: internvit.InternViTArgs, downsample_ratio: float) -> int:
    """The features per token after the pixel shuffle: each token takes the patches of a square of
    1 / downsample_ratio patches a side."""
    return vision.hidden_size * int(round(1 / downsample_ratio)) ** 2


def projector_weights(
    vision: internvit.InternViTArgs, downsample_ratio: float, hidden_size: int
) -> list[Weight]:
    shuffled = projector_width(vision, downsample_ratio)
    return [
        Weight(f"{PROJECTOR}0.weight", (shuffled,), "norm"),
        Weight(f"{PROJECTOR}0.bias", (shuffled,), "bias"),
        Weight(f"{PROJECTOR}1.weight", (hidden_size, shuffled), "linear"),
        Weight(f"{PROJECTOR}1.bias", (hidden_size,), "bias"),
        Weight(f"{PROJECTOR}3.weight", (hidden_size, hidden_size), "linear"),
        Weight(f"{PROJECTOR}3.bias", (hidden_size,), "bias"),
    ]


def weights(spec) -> list[Weight]:
    """Every tensor of the checkpoint of ``spec`` (config.ModelSpec), in its order."""
    text = language_model(spec.language_model)
    return [
        *internvit.weights(spec.vision),
        *projector_weights(spec.vision, spec.downsample_ratio, spec.text.hidden_size),
        *text.weights(spec.text),
    ]


def projector(ops, x: str, get: Callable[[str], np.ndarray], spec) -> str:
    """The encoder's output without its class token, pixel-shuffled (ps_version v2), through mlp1:
    [1, 1 + patches, d] -> [1, tokens, hidden]."""
    side = spec.vision.patches_per_side
    x = ops.pixel_shuffle(
        ops.drop_first_row(x, side * side), side, int(round(1 / spec.downsample_ratio))
    )
    x = ops.layer_norm(
        x, get(f"{PROJECTOR}0.weight"), get(f"{PROJECTOR}0.bias"), PROJECTOR_NORM_EPS
    )
    # fp32 in a quantised ViT too: these write the features the decoder reads, no later layer
    # averages their rounding away, and their multiply-adds are 0.3 % of InternViT-300M's. In int8
    # they took the features' cosine to fp32 from 0.99973 to 0.99953 (docs/benchmarks.md).
    x = ops.gelu(ops.linear(x, get(f"{PROJECTOR}1.weight"), get(f"{PROJECTOR}1.bias"), fp32=True))
    return ops.linear(x, get(f"{PROJECTOR}3.weight"), get(f"{PROJECTOR}3.bias"), fp32=True)


def image_features(ops, image: str, get, spec) -> str:
    """One tile's pixels to its tokens' features: what ``vit.onnx`` computes."""
    return projector(ops, internvit.encoder(ops, image, get, spec.vision), get, spec)


def transformers_names(language_model_type: str) -> list[tuple[str, str]]:
    """(original name pattern, transformers' name) for every weight but InternViT's fused qkv."""
    return [
        *internvit.TRANSFORMERS_NAMES,
        (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
        (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
        (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
        *language_model(language_model_type).TRANSFORMERS_NAMES,
    ]
