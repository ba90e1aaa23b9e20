"""``internvl-eval-toy``: the toy model's accuracy through the engine, per question type, on freshly
generated scenes (seeds apart from training's). An answer counts when the engine's greedy text,
stripped, equals the expected answer exactly; a grounding answer counts when its box has an IoU of
at least 0.5 with the shape's true box, in pixels of the picture (the mean IoU is reported too).
Where a question type has groups (shapes in the picture, images in the prompt), the accuracy of each
group is reported too."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from internvl_engine import Engine, GenerationConfig, InternVLError, Request
from internvl_engine.config import MANIFEST
from internvl_engine.grounding import iou

from .scenes import TASKS, Sample, samples

HELD_OUT_SEED = 10_000  # training draws from seed 0's stream; evaluation sets start here


MIN_IOU = 0.5  # a grounding answer's box is right from here (as RefCOCO's evaluation counts)


def request(sample: Sample) -> Request:
    if sample.ground:
        return Request("", images=sample.images, ground=sample.ground)
    if sample.video:
        return Request(sample.question, video_frames=sample.images)
    return Request(sample.question, images=sample.images)


def accuracy(engine: Engine, per_task: int, seed: int = HELD_OUT_SEED) -> dict[str, dict]:
    report = {}
    for k, task in enumerate(TASKS):
        wrong, groups, overlaps = [], {}, []
        for s in samples(task, per_task, seed + k):
            answer = engine.answer(
                request(s), GenerationConfig(max_new_tokens=64 if s.ground else 8)
            )
            text = answer.text.strip()
            if s.ground:
                overlap = iou(answer.boxes[0].corners, s.box) if answer.boxes else 0.0
                overlaps.append(overlap)
                right = overlap >= MIN_IOU
            else:
                right = text == s.answer
            if not right:
                wrong.append(f"{s.question} -> {text!r} (expected {s.answer!r})")
            if s.group:
                groups.setdefault(s.group, []).append(right)
        report[task] = {"accuracy": 1 - len(wrong) / per_task, "n": per_task, "wrong": wrong[:5]}
        if overlaps:
            report[task]["mean_iou"] = sum(overlaps) / len(overlaps)
        if groups:
            report[task]["groups"] = {
                g: {"accuracy": sum(r) / len(r), "n": len(r)} for g, r in sorted(groups.items())
            }
    return report


def table_rows(report: dict[str, dict]) -> tuple[list[str], list[str]]:
    """The Markdown rows of ``report`` (or of ``accuracy.json``): per question type, and per
    group."""
    per_task = [
        f"| {task} | {100 * r['accuracy']:.1f} % | {r['n']} |" for task, r in report.items()
    ]
    per_group = [
        f"| {task} | {group} | {100 * g['accuracy']:.1f} % | {g['n']} |"
        for task, r in report.items()
        for group, g in r.get("groups", {}).items()
    ]
    return per_task, per_group


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-eval-toy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure the toy model's accuracy through the engine, per question type, on "
        "freshly\n"
        "generated scenes (seeds apart from training's). An answer counts when it equals the\n"
        "expected one exactly.",
        epilog="Example:\n  internvl-eval-toy models/internvl-toy --per-task 200",
    )
    ap.add_argument(
        "model",
        type=Path,
        help="the toy checkpoint (exported to a temporary directory) or an export",
    )
    ap.add_argument("--per-task", type=int, default=200, help="questions per type (default 200)")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # 0 divided by zero; below 0 printed an empty table, numpy refused a seed
    if args.per_task < 1 or args.seed < 0:
        ap.error("--per-task must be >= 1 and --seed >= 0")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = args.model
            if not (model_dir / MANIFEST).is_file():
                from internvl_engine.tools.export import export

                model_dir = Path(tmp)
                export(args.model, model_dir, log=lambda *_: None)
            report = accuracy(Engine(model_dir), args.per_task, args.seed)
    except InternVLError as e:
        print(f"internvl-eval-toy: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        task_rows, group_rows = table_rows(report)
        print("| question type | accuracy | n |\n|---|---|---|", *task_rows, sep="\n")
        print(
            "\n| question type | group | accuracy | n |\n|---|---|---|---|", *group_rows, sep="\n"
        )
        for task, r in report.items():
            if "mean_iou" in r:
                print(f"\n{task}: mean IoU {r['mean_iou']:.3f} (a box counts from {MIN_IOU})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
