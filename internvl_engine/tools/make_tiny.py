"""``internvl-make-tiny``: write a random-weight InternVL2.5 checkpoint in the original layout.

The directory looks like ``OpenGVLab/InternVL2_5-1B-MPO``: ``config.json`` with ``llm_config`` and
``vision_config``, ``model.safetensors`` (bf16) with the original key names (``vision_model.*``,
``mlp1.*``, ``language_model.*``) and Qwen2 tokenizer files. Its tokenizer is a small byte-level
BPE trained here on a fixed text, followed by the chat and image special tokens, so special-token
ids differ from the real model's: code must look them up by string. ``--real-dims`` gives the
InternVL2.5-1B sizes (for benchmarks); the default is small enough for unit tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ..config import DEFAULT_SYSTEM_PROMPT, IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from ..models import internvl

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]
REAL_VOCAB_SIZE = 151674  # InternVL2.5-1B's embedding rows

TOKENIZER_TEXT = [
    DEFAULT_SYSTEM_PROMPT,
    "system",
    "user",
    "assistant",
    "Image-1: ",
    "Image-2: ",
    "Frame1: ",
    "Frame8: ",
    "What color is the shape? The shape is red. It is a blue circle on the left.",
    "What shape is it? A green square in the centre. A yellow triangle on the right.",
    "How many shapes are there? There are three shapes. One, two, three.",
    "Which way does the circle move? It moves left. It moves right. It appears. It disappears.",
    "Describe the image. Please describe this video in detail. What is in front of me?",
    "The robot sees a person, a table, a cup and a door. "
    "机器人看到了一个红色的圆。请描述这幅图像。",
    "0123456789 +-*/=()[]{}<>.,;:!?'\" \n\t",
]


def real_dims_config() -> tuple[dict, dict]:
    vision = dict(
        image_size=448,
        patch_size=14,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
    )
    llm = dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=REAL_VOCAB_SIZE,
        max_position_embeddings=32768,
    )
    return vision, llm


def tiny_config(vocab_size: int) -> tuple[dict, dict]:
    vision = dict(
        image_size=112,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    llm = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
    )
    return vision, llm


def hf_config(vision: dict, llm: dict, special_ids: dict[str, int]) -> dict:
    """An original-layout InternVL2.5 config.json (the fields the InternVL code reads)."""
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": vision["image_size"],
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "ps_version": "v2",
        "select_layer": -1,
        "use_thumbnail": True,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_act": "gelu",
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "qk_normalization": False,
            "num_channels": 3,
            "drop_path_rate": 0.0,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "initializer_range": 0.02,
            "use_flash_attn": False,
            **vision,
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "sliding_window": llm["max_position_embeddings"],
            "attention_dropout": 0.0,
            "bos_token_id": special_ids["<|endoftext|>"],
            "eos_token_id": special_ids["<|im_end|>"],
            "torch_dtype": "bfloat16",
            **llm,
        },
    }


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random bf16 weights for every tensor of the checkpoint (its model families' ``weights``, in
    their order), scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for w in internvl.weights(ModelSpec.from_hf_config(cfg)):
        if w.kind == "linear":  # weight [out, in]
            a = rng.standard_normal(w.shape, dtype=np.float32) / np.sqrt(w.shape[-1])
        elif w.kind == "norm":
            a = 1.0 + 0.1 * rng.standard_normal(w.shape, dtype=np.float32)
        elif w.kind == "bias":
            a = 0.05 * rng.standard_normal(w.shape, dtype=np.float32)
        elif w.kind == "scale":  # layer scale
            a = rng.uniform(0.3, 1.0, w.shape).astype(np.float32)
        # an embedding scaled by its fan-in, as it was rounded to bf16 first
        elif w.kind == "patch":
            a = (
                rng.standard_normal(w.shape, dtype=np.float32)
                .astype(ml_dtypes.bfloat16)
                .astype(np.float32)
            )
            a = a / np.sqrt(int(np.prod(w.shape[1:])))
        else:  # embedding-like
            a = rng.standard_normal(w.shape, dtype=np.float32)
        out[w.name] = a.astype(ml_dtypes.bfloat16)
    return out


def write_tokenizer(
    out: Path, bpe_vocab_size: int, text: list[str] = TOKENIZER_TEXT
) -> dict[str, int]:
    """Train a small byte-level BPE on ``text`` and write Qwen2 tokenizer files; returns
    special-token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text * 4, trainer)
    tok.model.save(str(out))  # vocab.json + merges.txt
    n = tok.get_vocab_size()
    special_ids = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(special_ids, indent=2) + "\n")
    decoder = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s, i in special_ids.items()
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "added_tokens_decoder": decoder,
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "clean_up_tokenization_spaces": False,
                "errors": "replace",
                "model_max_length": 8192,
                "split_special_tokens": False,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n"
    )
    return special_ids


def make_tiny(out: Path, seed: int = 0, real_dims: bool = False) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special_ids = write_tokenizer(out, bpe_vocab_size=512)
    vocab = max(special_ids.values()) + 1
    vision, llm = real_dims_config() if real_dims else tiny_config(vocab)
    cfg = hf_config(vision, llm, special_ids)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]]}, indent=2
        )
        + "\n"
    )
    size = cfg["vision_config"]["image_size"]
    # as OpenGVLab's repositories ship it: llama.cpp's converter reads the normalisation from it
    preprocessor = {
        "crop_size": size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "resample": 3,
        "size": size,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    save_file(random_weights(cfg, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-make-tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a random-weight InternVL2.5 checkpoint in the original layout "
        "(config.json,\n"
        "model.safetensors, Qwen2 tokenizer files), tiny for tests or at InternVL2.5-1B's sizes "
        "for\n"
        "benchmarks. Its weights are random: it answers gibberish.",
        epilog="Examples:\n  internvl-make-tiny --out ckpt\n  internvl-make-tiny --out ckpt-1b "
        "--real-dims",
    )
    ap.add_argument("--out", required=True, type=Path, help="directory to write the checkpoint to")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the weights")
    ap.add_argument(
        "--real-dims", action="store_true", help="InternVL2.5-1B sizes (about 2 GB) instead of tiny"
    )
    args = ap.parse_args(argv)
    if args.seed < 0:  # numpy's traceback, after --out was made
        ap.error("--seed must be >= 0")
    try:
        make_tiny(args.out, seed=args.seed, real_dims=args.real_dims)
    except OSError as e:  # an unwritable or full --out
        ap.exit(2, f"internvl-make-tiny: error: cannot write the checkpoint: {e}\n")
    print(
        f"wrote {'real-dimension' if args.real_dims else 'tiny'} InternVL2.5 checkpoint to "
        f"{args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
