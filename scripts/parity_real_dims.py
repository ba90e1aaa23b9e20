"""Engine vs transformers at real InternVL2.5-1B dimensions (random weights), teacher-forced.

    .venv/bin/python scripts/parity_real_dims.py --work /tmp/internvl_real [--tokens 4]

Builds the checkpoint with ``internvl-make-tiny --real-dims`` and exports it (both reused when
present), then reports the export time, the largest post-model logit difference at every step and
whether every engine token is the reference's argmax, for a text question and a one-image question.
Needs the test extras (torch) and about 12 GB of memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from internvl_engine import Engine, GenerationConfig, Request  # noqa: E402
from internvl_engine.cli import timing_table  # noqa: E402
from internvl_engine.engine import forced_logits  # noqa: E402
from internvl_engine.tools.export import export  # noqa: E402
from internvl_engine.tools.make_tiny import make_tiny  # noqa: E402
from internvl_engine.tools.reference import load_reference, reference_logits  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/internvl_real"))
    ap.add_argument("--tokens", type=int, default=4)
    args = ap.parse_args()
    hf, onnx_dir = args.work / "hf", args.work / "onnx"
    if not (hf / "model.safetensors").is_file():
        t0 = time.perf_counter()
        make_tiny(hf, seed=0, real_dims=True)
        print(f"make-tiny --real-dims: {time.perf_counter() - t0:.1f} s")
    if not (onnx_dir / "manifest.json").is_file():
        t0 = time.perf_counter()
        export(hf, onnx_dir)
        print(f"export: {time.perf_counter() - t0:.1f} s")
    engine = Engine(onnx_dir)
    reference = load_reference(hf, engine.tokenizer.ids["<IMG_CONTEXT>"])
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ok = True
    for request in (
        Request("Describe the robot's surroundings."),
        Request("What is in the image?", images=[image]),
    ):
        answer = engine.answer(request, GenerationConfig(max_new_tokens=args.tokens))
        prompt = engine.prepare(request)
        ref = reference_logits(
            reference, answer.prompt_token_ids + answer.token_ids, prompt.pixel_values
        )
        n = len(prompt.token_ids)
        logits = forced_logits(engine.llm, prompt.embeds, answer.token_ids[:-1])
        diffs = [float(np.abs(row - ref[n - 1 + i]).max()) for i, row in enumerate(logits)]
        argmax_ok = [
            bool(ref[n - 1 + i][t] >= ref[n - 1 + i].max() - 1e-3)
            for i, t in enumerate(answer.token_ids)
        ]
        ok &= all(argmax_ok) and max(diffs) <= 1e-3
        print(
            f"\n{len(request.images)} image(s), {n} prompt tokens: max |logit diff| per step "
            f"{[f'{d:.2e}' for d in diffs]}, tokens are reference argmax: {argmax_ok}"
        )
        print(timing_table(answer))
    print("\nPARITY", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
