"""The reference: transformers' own InternVL (``InternVLForConditionalGeneration``) for an
original-layout checkpoint, with the original keys mapped to transformers' names here (no
``trust_remote_code``, no network), both ways.

Development only: it needs torch and transformers (``requirements/dev.txt``). Parity tests, the
benchmark's ``--compare transformers`` and the toy-model training use it; the inference path never
imports it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from ..models import internvit, internvl
from .checkpoint import Checkpoint
from .native import native_state_dict


def hf_state_dict(ck: Checkpoint, language_model_type: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in native_state_dict(ck, language_model_type).items()}


def original_state_dict(model: InternVLForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's weights under the original InternVL key names (the inverse of
    ``hf_state_dict``)."""
    renames = internvl.transformers_names(model.config.text_config.model_type)
    hf = model.state_dict()
    out = {}
    for key in sorted(hf):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if m := internvit.TRANSFORMERS_Q.match(key):
            out[internvit.qkv_key(int(m[1]), m[2])] = torch.cat(
                [
                    hf[internvit.TRANSFORMERS_QKV.format(layer=m[1], part=part, kind=m[2])]
                    for part in "qkv"
                ]
            )
            continue
        if internvit.TRANSFORMERS_KV.match(key):
            continue
        for pattern, repl in renames:
            original, n = re.subn(_inverse(repl), _inverse_repl(pattern), key)
            if n:
                out[original] = hf[key]
                break
        else:
            raise KeyError(f"no original name for transformers key {key}")
    return out


def _inverse(repl: str) -> str:
    """A rename's transformers side as a pattern (``\\1`` becomes a layer-number group)."""
    return "^" + re.escape(repl).replace(r"\\1", r"(\d+)")


def _inverse_repl(pattern: str) -> str:
    """A rename's original side as a replacement (the layer-number group becomes ``\\1``)."""
    return pattern.lstrip("^").rstrip("$").replace(r"(\d+)", r"\1").replace("\\.", ".")


def reference_config(
    cfg: dict, image_token_id: int, attn_implementation: str = "eager"
) -> InternVLConfig:
    """transformers' ``InternVLConfig`` for an original ``config.json``."""
    v, t = cfg["vision_config"], cfg["llm_config"]
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=v["hidden_size"],
            num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"],
            intermediate_size=v["intermediate_size"],
            image_size=cfg["force_image_size"],
            patch_size=v["patch_size"],
            layer_norm_eps=v["layer_norm_eps"],
            attention_bias=v["qkv_bias"],
            use_qk_norm=v["qk_normalization"],
            norm_type=v["norm_type"],
            hidden_act="gelu",
            use_mean_pooling=True,
        ),
        text_config={
            k: t[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "rms_norm_eps",
                "rope_theta",
                "max_position_embeddings",
                "tie_word_embeddings",
            )
        }
        | {"model_type": "qwen2"},
        image_token_id=image_token_id,
        downsample_ratio=cfg["downsample_ratio"],
        image_seq_length=int(
            (cfg["force_image_size"] // v["patch_size"] * cfg["downsample_ratio"]) ** 2
        ),
        projector_hidden_act="gelu",
        tie_word_embeddings=t["tie_word_embeddings"],
    )
    config._attn_implementation = attn_implementation
    return config


def load_reference(
    hf_dir: Path, image_token_id: int, attn_implementation: str = "eager"
) -> InternVLForConditionalGeneration:
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    model = InternVLForConditionalGeneration(
        reference_config(cfg, image_token_id, attn_implementation)
    ).eval()
    missing, unexpected = model.load_state_dict(
        hf_state_dict(Checkpoint(hf_dir), cfg["llm_config"].get("model_type", "qwen2")),
        strict=False,
    )
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(
            f"reference weight mapping incomplete: missing={missing} unexpected={unexpected}"
        )
    return model


@torch.no_grad()
def reference_logits(model, input_ids: list[int], pixel_values: np.ndarray | None) -> np.ndarray:
    """Logits at every position of ``input_ids`` (one forward pass, teacher forcing)."""
    ids = torch.tensor([input_ids], dtype=torch.long)
    pv = (
        None
        if pixel_values is None
        else torch.from_numpy(np.asarray(pixel_values, dtype=np.float32))
    )
    return model(input_ids=ids, pixel_values=pv).logits[0].float().numpy()


@torch.no_grad()
def reference_image_features(model, pixel_values: np.ndarray) -> np.ndarray:
    out = model.model.get_image_features(
        pixel_values=torch.from_numpy(pixel_values.astype(np.float32)),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return out.pooler_output.float().numpy()
