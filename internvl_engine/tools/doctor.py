"""``internvl-doctor``: what a board user runs first. It checks a model directory against the AX650N
contract and the runtime it will run on, and runs it once.

Checks, in order: the backend (pyaxengine's version and providers on a board), the directory's files
(layers, post model, ViT, embedding table, config and tokenizer), every model's shape groups and
dtypes against the contract and config.json, the build's limits (and how many video frames fit),
whether the KV cache stays in the NPU's buffers, then one ViT run, one prefill chunk and one decode
step. Each line starts with ``ok`` or ``PROBLEM``; a problem says what is wrong and what to do.
Exit status: 0 when every check passes, 1 when there is a problem, 2 for a usage error.

    internvl-doctor --hf_model InternVL2_5-1B-MPO/ --axmodel_path InternVL2_5-1B-MPO_axmodel/ \\
        --vit_model vit_axmodel/internvl2_5_1b_vit.axmodel
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib import metadata

import numpy as np

from ..backends import resolve_backend
from ..cli import add_model_arguments, open_engine
from ..engine import Engine
from ..errors import BackendError, InternVLError, ModelDirError
from ..llm import LLM, MASK_BLOCKED
from ..prompt import IMG_CONTEXT

CONTRACT_INPUTS = ("K_cache", "V_cache", "indices", "input", "mask")
BOARD_GUIDE = "see docs/board.md"
FRAMES = 8  # the node's default video.num_frames


class Report:
    def __init__(self, out=sys.stdout):
        self.out, self.problems, self.checks = out, 0, 0

    def ok(self, text: str) -> None:
        self.checks += 1
        print(f"ok       {text}", file=self.out, flush=True)

    def problem(self, what: str, todo: str) -> None:
        self.checks += 1
        self.problems += 1
        print(f"PROBLEM  {what} -> {todo}", file=self.out, flush=True)


def check_backend(report: Report, backend: str, provider: str | None) -> bool:
    if backend != "axengine":
        import onnxruntime

        from ..cpu import cpu_info, int8_path

        report.ok(f"backend onnxruntime {onnxruntime.__version__} (CPU)")
        report.ok(f"CPU {cpu_info().describe()}; {int8_path()}")
        return True
    from ..backend_axengine import import_axengine

    try:
        axengine = import_axengine()
    except BackendError as e:
        report.problem(str(e), f"run this on the board, with pyaxengine installed ({BOARD_GUIDE})")
        return False
    try:
        version = metadata.version("axengine")
    except metadata.PackageNotFoundError:
        version = "(version unknown: not installed as a package)"
    available = list(axengine.get_available_providers())
    report.ok(f"pyaxengine {version}, providers {', '.join(available)}")
    if provider and provider not in available:
        report.problem(
            f"provider {provider} is not available", f"choose one of {', '.join(available)}"
        )
        return False
    return True


def _io(specs) -> str:
    return ", ".join(f"{name} {dtype} {list(shape)}" for name, dtype, shape in specs)


def check_models(report: Report, engine: Engine) -> None:
    """Every layer's groups equal layer 0's and follow the contract; post, ViT and embeddings fit
    config.json."""
    spec = engine.spec
    if isinstance(engine.llm, LLM):
        check_layers(report, engine)
    else:
        table = engine.llm.embeddings
        prompts = (
            f", prompts through {engine.llm.prompt_path.name}" if engine.llm.prompt_path else ""
        )
        report.ok(
            f"decoder: {spec.text.num_layers} layers and the lm_head in one graph "
            f"({engine.llm.path.name}"
            f"{prompts}), the KV cache in place; embedding table {table.shape[0]} x "
            f"{table.shape[1]} {table.dtype}"
        )
    if engine.vit is None:
        report.problem(
            "no ViT model: questions with images or video will be refused",
            "give --vit_model (or put one *vit*.axmodel file in the model directory)",
        )
    else:  # the engine refuses a ViT that does not take this model's tiles
        report.ok(
            f"ViT: input {list(engine.vit.groups[0]['image'])}, {spec.num_image_token} tokens per "
            "tile"
        )


def check_layers(report: Report, engine: Engine) -> None:
    text, shapes = engine.spec.text, engine.llm.shapes
    first = engine.llm.layers[0]
    if shapes.dynamic:
        report.ok(
            f"{len(engine.llm.layers)} decoder layers with dynamic shapes (an onnxruntime export)"
        )
    else:
        prefill = ", ".join(str(g.capacity) for g in shapes.prefill)
        report.ok(
            f"{len(engine.llm.layers)} decoder layers: decode against {shapes.decode.capacity} "
            "cached rows; "
            f"prefill chunks of {shapes.prefill[0].tokens} tokens after {prefill} rows"
        )
    different = [i for i, layer in enumerate(engine.llm.layers) if layer.groups != first.groups]
    if different:
        report.problem(
            f"layers {different} have other shape groups than layer 0",
            "compile every layer in one pulsar2 llm_build run, with the same options",
        )
    wrong = []
    dtypes = {name: first.input_dtype(name) for name in CONTRACT_INPUTS}
    if dtypes["indices"] != np.uint32:
        wrong.append(f"indices are {dtypes['indices']}, the contract says uint32")
    if len({dtypes[n] for n in ("K_cache", "V_cache", "input", "mask")}) != 1:
        wrong.append("K_cache, V_cache, input and mask do not share one dtype")
    elif dtypes["mask"].name not in ("bfloat16", "float32"):
        wrong.append(
            f"the mask is {dtypes['mask']}; the contract's {MASK_BLOCKED:g} needs bfloat16 or "
            "float32"
        )
    if wrong:
        report.problem(
            "the decoder layers do not fit the contract: " + "; ".join(wrong),
            f"compile the layers from this checkpoint with pulsar2 llm_build ({BOARD_GUIDE})",
        )
    else:
        report.ok(
            f"layer inputs: {', '.join(f'{n} {dtypes[n]}' for n in CONTRACT_INPUTS)} "
            f"(kv_dim {text.kv_dim}, hidden {text.hidden_size}, as config.json)"
        )
    post = engine.llm.post.groups[0]["input"]
    table = engine.llm.embeddings
    if post[-1] != text.hidden_size:
        report.problem(
            f"the post model takes {list(post)}, config.json's hidden size is {text.hidden_size}",
            "compile the post model from this checkpoint",
        )
    else:
        report.ok(
            f"post model: input {list(post)}; embedding table {table.shape[0]} x {table.shape[1]} "
            f"{table.dtype}"
        )


def check_limits(report: Report, engine: Engine) -> None:
    """The build's limits, and how many frames of a video question fit them."""
    build = engine.llm.build

    def prompt_tokens(frames: int) -> int:
        return len(
            engine.tokenizer.encode_chat(
                engine.system_prompt,
                "Which way does it move?",
                [1] * frames,
                engine.spec.num_image_token,
                video=True,
            )
        )

    line = (
        f"limits: prompts up to {build.max_prompt_tokens} tokens, "
        f"context {build.kv_cache_len} tokens"
    )
    one, per_frame = prompt_tokens(1), prompt_tokens(2) - prompt_tokens(1)
    fit = 1 + (build.max_prompt_tokens - one) // per_frame if one <= build.max_prompt_tokens else 0
    needed = prompt_tokens(FRAMES)
    if fit < 2:
        report.problem(
            f"{line}: not even a 2-frame video question fits",
            "build the layers for longer prompts (pulsar2 llm_build --last_kv_cache_len)",
        )
    elif fit < FRAMES:
        chunk = build.prefill_chunk
        report.ok(
            f"{line}; a {FRAMES}-frame video question needs about {needed} tokens, so {fit} frames "
            "are used "
            f"(all {FRAMES} need history groups up to --last_kv_cache_len "
            f"{-(-(needed - chunk) // chunk) * chunk})"
        )
    else:
        report.ok(f"{line}; a {FRAMES}-frame video question ({needed} tokens) fits")


def check_runs(report: Report, engine: Engine) -> None:
    llm = engine.llm
    if llm.resident:
        report.ok(
            "KV cache kept in the backend's buffers (two decode steps agreed with the plain path)"
        )
    if engine.vit is not None:
        started = time.perf_counter()
        try:
            features = engine.encode_tile(np.zeros(engine.vit.groups[0]["image"], np.float32))
        except ModelDirError as e:
            how = (
                "internvl-export"
                if engine.backend == "onnxruntime"
                else "internvl-export, then pulsar2 build"
            )
            report.problem(str(e), f"export the ViT again from this checkpoint ({how})")
        else:
            ms = (time.perf_counter() - started) * 1e3
            if np.isfinite(np.asarray(features, np.float32)).all():
                report.ok(f"ViT run: {ms:.1f} ms per tile")
            else:
                report.problem(
                    "the ViT's features are not finite",
                    "compile the ViT again; check its calibration set",
                )
    ids = (engine.tokenizer.encode("What is in front of the robot? ") * llm.build.prefill_chunk)[
        : llm.build.prefill_chunk
    ]
    started = time.perf_counter()
    logits = llm.prefill(llm.embed(ids), reuse_prefix=False)
    prefill_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    step = llm.decode(int(np.argmax(logits)))
    decode_ms = (time.perf_counter() - started) * 1e3
    if not (np.isfinite(logits).all() and np.isfinite(step).all()):
        report.problem(
            "the logits are not finite (NaN or Inf)",
            "try --resident-kv off; if that helps, report the "
            "pyaxengine version; otherwise compile the layers again",
        )
    else:
        report.ok(
            f"prefill of {len(ids)} tokens: {prefill_ms:.1f} ms; one decode step: {decode_ms:.1f} "
            "ms; "
            "logits finite"
        )


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def diagnose(args, report: Report) -> None:
    model_dir = args.model_dir or args.axmodel_path
    if model_dir is None:
        raise ModelDirError("give --model-dir (or the seed's --axmodel_path)")
    try:
        backend = resolve_backend(args.backend, model_dir)
    except BackendError as e:
        report.problem(str(e), "choose --backend auto, onnxruntime or axengine")
        return
    if not check_backend(report, backend, args.provider):
        return
    warnings = _Warnings()
    logging.getLogger("internvl_engine").addHandler(warnings)
    try:
        engine = open_engine(args)
    except ModelDirError as e:
        report.problem(f"model directory: {e}", "lay it out as docs/board.md shows (Model files)")
        return
    except BackendError as e:
        if backend == "onnxruntime":
            report.problem(
                f"cannot run the models: {e}",
                "export the model again (internvl-export) with the "
                "onnxruntime that runs it (requirements/engine.txt)",
            )
        else:
            report.problem(
                f"cannot run the models: {e}",
                "copy or compile the named file again for this chip; "
                f"check pyaxengine and the board SDK ({BOARD_GUIDE})",
            )
        return
    except InternVLError as e:
        report.problem(str(e), BOARD_GUIDE)
        return
    finally:
        logging.getLogger("internvl_engine").removeHandler(warnings)
    where = (
        f"{engine.backend} ({engine.llm.layers[0].provider})"
        if engine.backend == "axengine"
        else engine.backend
    )
    report.ok(
        f"model directory {model_dir}: {where}, config and tokenizer read, "
        f"<IMG_CONTEXT> is token {engine.tokenizer.ids[IMG_CONTEXT]}"
    )
    if engine.cpu_changes:
        report.ok(
            "for this CPU's int8 GEMM: "
            + "; ".join(
                f"{name}: {', '.join(changes)}" for name, changes in engine.cpu_changes.items()
            )
        )
    for message in warnings.messages:
        report.problem(
            message,
            "decoding is slower this way; try another pyaxengine version, or --resident-kv off "
            f"to skip the check ({BOARD_GUIDE})",
        )
    if args.resident_kv == "off":
        report.ok("KV cache handed to every run (--resident-kv off)")
    check_models(report, engine)
    check_limits(report, engine)
    try:
        check_runs(report, engine)
    except InternVLError as e:
        report.problem(
            f"running the models failed: {e}", f"check the board SDK and pyaxengine ({BOARD_GUIDE})"
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-doctor",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check a model directory and the runtime it will run on, then run it once: "
        "what a board\n"
        "user runs first. One line per check, starting ok or PROBLEM; a problem says what is "
        "wrong\n"
        "and what to do. Exit status 0 when every check passes, 1 when one does not.",
        epilog="Example (on an AX650N board):\n"
        "  internvl-doctor --hf_model InternVL2_5-1B-MPO/ --axmodel_path "
        "InternVL2_5-1B-MPO_axmodel/ \\\n"
        "      --vit_model vit_axmodel/internvl2_5_1b_vit.axmodel",
    )
    add_model_arguments(ap)
    args = ap.parse_args(argv)
    report = Report()
    try:
        diagnose(args, report)
    except InternVLError as e:
        ap.error(str(e))
    if report.problems:
        print(f"{report.problems} problem(s) in {report.checks} checks", flush=True)
        return 1
    print(f"all {report.checks} checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
