"""``internvl-fidelity``: how closely model directories (e.g. the int8 and int4 exports) follow
another (the fp32 export of the same checkpoint) over a fixed prompt set.

For each prompt the reference generates greedily; the candidate is then teacher-forced on the same
tokens, and at every step the logits' cosine similarity and whether both argmaxes agree are
recorded. Reported per prompt and overall: mean and minimum cosine, greedy agreement (share of
steps with the same argmax), and whether the candidate's own greedy answer equals the reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..config import Manifest
from ..engine import Engine, Request, argmax, forced_logits, generate_step
from ..errors import InternVLError


def prompt_set() -> list[tuple[str, Request]]:
    """Fixed prompts: text only, one image, four images, a short clip (random-pixel pictures,
    seeded)."""
    rng = np.random.default_rng(2024)
    picture = lambda: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # noqa: E731
    return [
        ("text", Request("What is in front of the robot? Answer in one sentence.")),
        (
            "text-long",
            Request("List the steps to make a cup of tea, then explain why each step matters."),
        ),
        ("1 image", Request("Describe the image.", images=[picture()])),
        (
            "4 images",
            Request("Which image is the brightest?", images=[picture() for _ in range(4)]),
        ),
        (
            "video",
            Request("What happens in the video?", video_frames=[picture() for _ in range(4)]),
        ),
    ]


def greedy(
    engine: Engine, embeds: np.ndarray, new_tokens: int
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens (as ``Engine.answer`` with the default config) and the logits that chose
    them."""
    tokens, logits = [], []
    for step in generate_step(engine.llm, embeds, argmax, reuse_prefix=False):
        logits.append(step.logits)
        if step.token in engine.tokenizer.stop_ids:
            break
        tokens.append(step.token)
        if len(tokens) >= new_tokens:
            break
    return tokens, logits


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(
    reference: Engine, candidate: Engine, new_tokens: int = 16, prompts: list[str] | None = None
) -> dict:
    """The candidate against the reference on ``prompts`` (names of ``prompt_set``; None: all)."""
    rows = []
    for name, request in prompt_set():
        if prompts is not None and name not in prompts:
            continue
        candidate_embeds = candidate.prepare(request).embeds  # each engine encodes the images once
        tokens, ref_logits = greedy(reference, reference.prepare(request).embeds, new_tokens)
        ref_logits = ref_logits[: max(len(tokens), 1)]  # the steps that chose the tokens
        cand_logits = forced_logits(candidate.llm, candidate_embeds, tokens[:-1])
        cos = [cosine(a, b) for a, b in zip(ref_logits, cand_logits)]
        agree = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(ref_logits, cand_logits)]
        own, _ = greedy(candidate, candidate_embeds, new_tokens)
        rows.append(
            {
                "prompt": name,
                "steps": len(cos),
                "cosine_mean": float(np.mean(cos)),
                "cosine_min": float(np.min(cos)),
                "greedy_agreement": float(np.mean(agree)),
                "same_answer": own == tokens,
            }
        )
    steps = sum(r["steps"] for r in rows)
    overall = {
        "steps": steps,
        "cosine_mean": sum(r["cosine_mean"] * r["steps"] for r in rows) / steps,
        "cosine_min": min(r["cosine_min"] for r in rows),
        "greedy_agreement": sum(r["greedy_agreement"] * r["steps"] for r in rows) / steps,
        "same_answers": sum(r["same_answer"] for r in rows),
        "prompts": len(rows),
    }
    return {"prompts": rows, "overall": overall}


def table(report: dict) -> str:
    lines = [
        "| prompt | steps | logits cosine mean | min | greedy agreement | same greedy answer |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["prompts"]:
        lines.append(
            f"| {r['prompt']} | {r['steps']} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | "
            f"{100 * r['greedy_agreement']:.1f} % | {'yes' if r['same_answer'] else 'no'} |"
        )
    lines.append(overall_row("all", report["overall"]))
    return "\n".join(lines)


def overall_row(name: str, o: dict) -> str:
    return (
        f"| {name} | {o['steps']} | {o['cosine_mean']:.5f} | {o['cosine_min']:.5f} | "
        f"{100 * o['greedy_agreement']:.1f} % | {o['same_answers']}/{o['prompts']} |"
    )


def describe(model_dir: Path) -> str:
    """The candidate's name with how it was exported (precision, block size, prompt weights)."""
    source = Manifest.read(model_dir).source
    block = f", blocks of {source['block_size']}" if source.get("block_size") else ""
    if source.get("gate_up_block_size") not in (None, source.get("block_size")):
        block += f" (gate/up {source['gate_up_block_size']})"
    prompts = f", prompts {source['prefill']}" if source.get("prefill", "same") != "same" else ""
    return f"{model_dir.name} ({source.get('precision', 'fp32')}{block}{prompts})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-fidelity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure how closely model directories (an int8 and an int4 export, say) "
        "follow another (the\n"
        "fp32 export of the same checkpoint) on a fixed set of prompts: the cosine of their "
        "logits,\n"
        "how often their greedy choices agree, and whether their greedy answers are the same.",
        epilog="Example:\n  internvl-fidelity --reference model --candidate model-int8 model-int4",
    )
    ap.add_argument(
        "--reference", required=True, type=Path, help="model directory to follow (e.g. fp32 export)"
    )
    ap.add_argument(
        "--candidate",
        required=True,
        type=Path,
        nargs="+",
        help="model directories to check (e.g. int8 and int4 exports)",
    )
    ap.add_argument(
        "--new-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)"
    )
    ap.add_argument(
        "--prompts",
        nargs="+",
        choices=[name for name, _ in prompt_set()],
        help="only these of the prompt set (default: all; an emulated CPU takes minutes a prompt)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.new_tokens < 1:
        ap.error("--new-tokens must be >= 1")
    try:
        checkpoint = Manifest.read(args.reference).source.get("sha256")
        for candidate in args.candidate:  # formats of one checkpoint, or the figures mean nothing
            if (other := Manifest.read(candidate).source.get("sha256")) != checkpoint:
                raise InternVLError(
                    f"{candidate} is an export of another checkpoint than {args.reference} (sha256 "
                    f"{str(other)[:12]}... against {str(checkpoint)[:12]}...): compare exports of "
                    "one "
                    "checkpoint"
                )
        reference = Engine(args.reference)
        reports = {
            describe(c): compare(reference, Engine(c), args.new_tokens, args.prompts)
            for c in args.candidate
        }
    except InternVLError as e:
        print(f"internvl-fidelity: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"reference": str(args.reference), "candidates": reports}, indent=1))
        return 0
    for name, report in reports.items():
        print(f"{name} against {args.reference.name}\n\n{table(report)}\n")
    if len(reports) > 1:
        print(
            "| candidate | steps | logits cosine mean | min | greedy agreement | same greedy "
            "answers |\n"
            "|---|---|---|---|---|---|"
        )
        print("\n".join(overall_row(name, r["overall"]) for name, r in reports.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
