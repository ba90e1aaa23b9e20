"""``internvl-export``: turn an original InternVL checkpoint into the model directory the engine
runs.

The graphs are written directly with ``onnx.helper`` from the safetensors weights (numpy only, no
torch, no ``trust_remote_code``), each model family's layers as ``models/`` writes them, in one of
three layouts (``--contract``; ``tools/graph.py`` has their inputs and outputs):

- ``fused`` (default, the CPU's): ``decoder.onnx``, every decoder layer and the lm_head in one
  graph;
- ``dynamic``: the AX650N layer contract with dynamic shapes, one ``layer_{i}.onnx`` per layer and
  ``post.onnx``;
- ``axmodel``: the same contract with exactly the shape groups Pulsar2 ``llm_build`` compiles.

Beside them: ``vit.onnx`` (``image`` [1, 3, S, S] -> ``output`` [1, N, H]: InternViT, drop CLS,
pixel shuffle, ``mlp1``), the embedding table (looked up on the host), the tokenizer files,
``config.json`` and ``manifest.json`` (sizes, build limits, file names, source checkpoint with its
sha256, contract and precision), so the directory is self-contained.

``--precision int8|int4`` stores the decoder's weights (lm_head included) block-wise quantised for
onnxruntime's MatMulNBits (biases added inside it): ``--block-size`` weights share a scale and zero
point (``--gate-up-block-size`` in the MLP's gate and up projections), and ``--accuracy-level 4``
multiplies in int8 on the CPU. MatMulNBits is the fastest for one row (a decode step is bound by
reading the weights); for many rows onnxruntime's int8 GEMM is faster, so ``--prefill int8`` (the
default with int8) writes ``prompt_decoder.onnx`` beside the fused decoder: the same graph with
``RowInt8`` weights, which the engine runs for prompts over the same K/V buffers. The ViT's linear
layers go to ``RowInt8`` as well (``--vit-precision``), and in the fused layout its attention is
onnxruntime's MultiHeadAttention kernel. docs/export.md has the details and the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from ..cli import exit_on_sigterm
from ..config import MANIFEST, LayerBuild, Manifest, ModelSpec, read_hf_config
from ..errors import InternVLError, ModelDirError
from ..models import internvl
from .checkpoint import Checkpoint
from .graph import (
    ContractLayer,
    ContractPost,
    FusedDecoder,
    Graph,
    Quantization,
    RowInt8,
    save_model,
)

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
# The ViT with a quantised decoder: int8 weights per output channel, its rows quantised as they
# run, through onnxruntime's int8 GEMM (RowInt8): a 448 px tile took 0.38 of the time of int8 in
# MatMulNBits' blocks of 128 with AMX, 0.52 with AVX-512 VNNI (0.61 on a Zen 4), 0.75 on AVX2
# (whose int8 kernel is the exact u8 x u8 there, against those blocks' fp32), with features at
# cosine 0.9997 to fp32's (docs/benchmarks.md).
VIT_QUANTIZATION = RowInt8()
VIT_PRECISIONS = ("fp32", "int8")
# How the fused decoder multiplies prompts: "same" as decode steps, or "int8" with a second graph of
# RowInt8 weights (prompt_decoder.onnx). For int8 a 384-token prefill took 0.61 of the time at
# InternVL2.5-1B's sizes, for 0.5 GB more on disk and 0.85 GB more in memory (docs/benchmarks.md);
# int4 is about small weights and keeps one graph. The int8 prompt graph costs image prompts'
# logits: 0.9990 to fp32's against 0.9992 through "same" (random weights), and no one kind of its
# linear layers in blocks instead lifts that (docs/benchmarks.md).
PREFILLS = {"same": None, "int8": RowInt8()}
DEFAULT_PREFILL = {"fp32": "same", "int8": "int8", "int4": "same"}


def build_vit(
    ck: Checkpoint,
    spec: ModelSpec,
    quant: Quantization | RowInt8 | None = None,
    fused_attention: bool = False,
) -> onnx.ModelProto:
    """``fused_attention``: onnxruntime's MultiHeadAttention (not in the onnxruntime a board's
    numpy allows, nor for Pulsar2: the fused contract's)."""
    if why := spec.vision.supported():
        raise ModelDirError(why)
    g = Graph("internvl_vit", quant, fused_attention)
    s = spec.image_size
    features = internvl.image_features(g, g.input("image", np.float32, [1, 3, s, s]), ck.get, spec)
    g.output(features, "output", np.float32, [1, spec.num_image_token, spec.text.hidden_size])
    return g.model()


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
    """Decoder layer ``i`` in the AX650N contract (all shapes dynamic, or one shape group's)."""
    text = internvl.language_model(spec.language_model)
    g = ContractLayer(f"qwen2_layer_{i}", spec.text, text.rope_inv_freq(spec.text), group, quant)
    return g.finish(*text.layer(g, g.rows, None, i, ck.get, spec.text))


def build_post(
    ck: Checkpoint, spec: ModelSpec, tokens: int | str = "tokens", quant: Quantization | None = None
) -> onnx.ModelProto:
    text = internvl.language_model(spec.language_model)
    g = ContractPost(spec.text, tokens, quant)
    return g.finish(text.head(g, g.rows, None, ck.get, ck.__contains__, spec.text))


def build_decoder(
    ck: Checkpoint, spec: ModelSpec, build: LayerBuild, quant: Quantization | RowInt8 | None = None
) -> onnx.ModelProto:
    """Every decoder layer and the lm_head as one graph (tools/graph.py's FusedDecoder)."""
    text = internvl.language_model(spec.language_model)
    g = FusedDecoder(spec.text, build.kv_cache_len, text.rope_inv_freq(spec.text), quant)
    stream, pending = g.rows, None
    for i in range(spec.text.num_layers):
        stream, pending = text.layer(g, stream, pending, i, ck.get, spec.text)
    return g.finish(text.head(g, stream, pending, ck.get, ck.__contains__, spec.text))


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
    from ..fused import runs_here

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
    fp32 or int8 (``VIT_QUANTIZATION``); by default int8 with a quantised decoder, else fp32. The
    fused contract's ViT runs its attention in onnxruntime's MultiHeadAttention kernel.
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
            build_vit(
                ck,
                spec,
                VIT_QUANTIZATION if vit_precision == "int8" else None,
                fused_attention=contract == "fused",
            ),
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
        table = ck.get(internvl.language_model(spec.language_model).EMBED_TOKENS)
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
        # the manifest last
        for path in sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST):
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
        help="ViT weights: int8 (default with --precision int8 or int4: int8 GEMMs, 0.38-0.75 of "
        "the time per tile of int8 in blocks) or fp32 (default otherwise)",
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
