"""``internvl-infer``: ask a question about images, a video or nothing, from the command line.

Accepts the seed demo's flags (``--hf_model``, ``--axmodel_path``, ``--vit_model``, ``-q``, ``-i``,
``-v``, ``--segments``) and their kebab-case forms. Without ``--json`` the answer streams to stdout
followed by the seed's timing table; with ``--json`` exactly one JSON object is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .answering import Answer, Chunk, Request
from .backend_axengine import PROVIDERS
from .backends import BACKENDS
from .config import DEFAULT_SYSTEM_PROMPT
from .engine import Engine
from .errors import InternVLError, ModelDirError
from .llm import RESIDENT_KV
from .preprocess import load_image, load_video_frames
from .sampling import GenerationConfig

REMOTE_KEY_VARIABLE = "INTERNVL_SERVER_API_KEY"  # as the node's server_api_key_env default


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """Where the model is and how to run it (the seed's flag names work too)."""
    ap.add_argument(
        "--model-dir",
        "--model_dir",
        type=Path,
        help="model directory: internvl-export output, or a Pulsar2 axmodel directory",
    )
    ap.add_argument(
        "--axmodel-path", "--axmodel_path", type=Path, help="the seed's name for --model-dir"
    )
    ap.add_argument(
        "--hf-model",
        "--hf_model",
        type=Path,
        help="original checkpoint whose config and tokenizer to use (needed for a Pulsar2 "
        "directory)",
    )
    ap.add_argument(
        "--vit-model",
        "--vit_model",
        type=Path,
        help="ViT model file to use instead of the model directory's (for the same backend)",
    )
    ap.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto (default): axengine for a directory of .axmodel files, else onnxruntime",
    )
    ap.add_argument(
        "--provider",
        choices=PROVIDERS,
        help="axengine provider (default: the first available: on-board NPU, then PCIe card)",
    )
    ap.add_argument(
        "--resident-kv",
        "--resident_kv",
        choices=RESIDENT_KV,
        default="auto",
        help="keep the KV cache in the backend's buffers: auto (default: if a trial run agrees "
        "with "
        "the plain path), on (required), off (hand every run the whole cache, as the seed does)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        help="CPU threads per session (default, or 0: every core it may use, within its CPU quota)",
    )


def open_engine(args, **engine_args) -> Engine:
    model_dir = args.model_dir or args.axmodel_path
    if model_dir is None:
        raise ModelDirError("give --model-dir (or the seed's --axmodel_path): the model directory")
    return Engine(
        model_dir,
        backend=args.backend,
        threads=args.threads,
        tokenizer_dir=args.hf_model,
        vit_model=args.vit_model,
        provider=args.provider,
        resident_kv=args.resident_kv,
        **engine_args,
    )


def log_to_stderr(prog: str) -> None:
    """Warnings (a fallback, frames left out of a video) as one line each on stderr."""
    logging.basicConfig(
        level=logging.WARNING, format=f"{prog}: %(levelname)s: %(message)s", stream=sys.stderr
    )


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, ``kill``, a service stopping) exits through ``finally`` blocks, as
    Ctrl-C does: killed outright, a tool that writes files would leave them half-written (an
    export's staging folder is gigabytes at InternVL2.5-1B's sizes)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="internvl-infer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask InternVL2.5 a question about images, a video or nothing, and print the "
        "answer as it\n"
        "streams, then the seed's timing table (or one JSON object with --json). The seed demo's\n"
        "flags work too (--hf_model, --axmodel_path, --vit_model).",
        epilog="Examples:\n"
        "  internvl-infer --model-dir model -q 'What is in front of me?' -i photo.jpg\n"
        "  internvl-infer --model-dir model -q 'What happens?' -v clip.mp4 --segments 8\n"
        "  internvl-infer --model-dir model -q 'Is the door open?' -i door.jpg --choices yes,no\n"
        "  internvl-infer --model-dir model --ground 'the red cup' -i photo.jpg --draw boxes.png",
    )
    add_model_arguments(ap)
    asked = ap.add_mutually_exclusive_group(required=True)
    asked.add_argument("-q", "--question", help="the question")
    asked.add_argument(
        "--ground",
        metavar="PHRASE",
        help="find this (e.g. 'the red cup') in the image: InternVL's grounding question; the "
        "answer's boxes are printed in pixels of the image",
    )
    ap.add_argument(
        "--draw",
        type=Path,
        metavar="OUT.png",
        help="write a copy of the image with the answer's boxes drawn on it (one image)",
    )
    ap.add_argument("-i", "--images", nargs="+", default=[], type=Path, help="image files")
    ap.add_argument("-v", "--video", type=Path, help="a video file; frames are sampled uniformly")
    ap.add_argument(
        "--segments", type=int, default=8, help="frames sampled from the video (default 8)"
    )
    ap.add_argument(
        "--max-tiles",
        "--max_tiles",
        type=int,
        default=1,
        help="dynamic tiles per image (default 1)",
    )
    ap.add_argument(
        "--choices",
        type=lambda text: text.split(","),
        default=[],
        metavar="A,B,...",
        help="answer with the most likely of these comma-separated choices, with their "
        "probabilities",
    )
    ap.add_argument("--system-prompt", "--system_prompt", default=DEFAULT_SYSTEM_PROMPT)
    g = GenerationConfig()
    ap.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=g.max_new_tokens)
    ap.add_argument("--temperature", type=float, default=g.temperature, help="0 = greedy (default)")
    ap.add_argument("--top-k", "--top_k", type=int, default=g.top_k)
    ap.add_argument("--top-p", "--top_p", type=float, default=g.top_p)
    ap.add_argument(
        "--repetition-penalty", "--repetition_penalty", type=float, default=g.repetition_penalty
    )
    ap.add_argument("--seed", type=int, default=None, help="sampling seed")
    ap.add_argument(
        "--json", action="store_true", help="print one JSON object instead of streaming"
    )
    ap.add_argument(
        "--server-url",
        help="ask this OpenAI-compatible server (internvl-serve, vLLM: http://host:8000/v1) "
        f"instead of a local model; its API key from ${REMOTE_KEY_VARIABLE}",
    )
    ap.add_argument("--server-model", default="", help="the server's model (default: its first)")
    return ap


def timing_table(answer: Answer) -> str:
    """The seed README's table: Image num | ImageEncoder | Prefill TTFT | Decoder | tokens/s."""
    t = answer.timings
    vit = sum(t.vit_ms)
    rows = [
        "| Image num | ImageEncoder ms | Prefill TTFT ms (tokens) | Decoder ms/token | tokens/s |",
        "|---|---|---|---|---|",
        f"| {len(t.vit_ms)} | {vit:.1f} | {t.ttft_ms:.1f} ({t.prefill_tokens}) | "
        f"{t.decode_ms_per_token:.2f} | {t.decode_tokens_per_s:.2f} |",
    ]
    return "\n".join(rows)


def box_lines(answer: Answer) -> list[str]:
    """One line per box (pixels of its image) and per box that names no place."""
    lines = [
        f"box {b.label!r}: x1={b.x1:.1f} y1={b.y1:.1f} x2={b.x2:.1f} y2={b.y2:.1f}"
        f" (image {b.image + 1}; {list(b.normalized)} of 1000)"
        for b in answer.boxes
    ]
    return lines + [f"not a box: {p}" for p in answer.box_problems]


def draw_boxes(rgb, boxes, path: Path) -> None:
    """A copy of ``rgb`` with ``boxes`` drawn and labelled, written to ``path``."""
    import cv2
    import numpy as np

    image = np.ascontiguousarray(rgb[..., ::-1])  # OpenCV writes BGR
    thickness = max(1, round(max(image.shape[:2]) / 320))
    for box in boxes:
        corners = (round(box.x1), round(box.y1)), (round(box.x2), round(box.y2))
        cv2.rectangle(image, *corners, (0, 0, 255), thickness)
        cv2.putText(
            image,
            box.label,
            (corners[0][0], max(12, corners[0][1] - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thickness,
            (0, 0, 255),
            thickness,
            cv2.LINE_AA,
        )
    if not cv2.imwrite(str(path), image):
        raise InternVLError(
            f"--draw {path}: cannot write it (a folder that exists, a .png or .jpg)"
        )


def run(args) -> int:
    if args.video and args.images:
        raise InternVLError("give either --images or --video, not both")
    if args.draw and len(args.images) != 1:
        raise InternVLError("--draw needs exactly one image (-i)")
    images = [load_image(p) for p in args.images]
    frames = load_video_frames(args.video, args.segments) if args.video else []
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    if args.server_url:
        from .remote import RemoteAnswerer

        key = os.environ.get(REMOTE_KEY_VARIABLE)
        engine = RemoteAnswerer(args.server_url, args.server_model, key, 60.0, args.system_prompt)
    else:
        engine = open_engine(args, system_prompt=args.system_prompt)
    request = Request(
        args.question or "",
        images=images,
        video_frames=frames,
        max_tiles=args.max_tiles,
        choices=args.choices,
        ground=args.ground or "",
    )
    if args.json:
        answer = engine.answer(request, config)
        result = {
            "text": answer.text,
            "prompt_token_ids": answer.prompt_token_ids,
            "token_ids": answer.token_ids,
            "timings": dataclasses.asdict(answer.timings),
        }
        if args.choices:
            result |= {
                "choice_index": answer.choice_index,
                "choice_probabilities": answer.choice_probabilities,
            }
        else:
            result |= {
                "boxes": [b.as_dict() for b in answer.boxes],
                "box_problems": [p.as_dict() for p in answer.box_problems],
            }
        if args.draw:
            draw_boxes(images[0], answer.boxes, args.draw)
        print(json.dumps(result, ensure_ascii=False))
        return 0
    items = engine.stream(request, config)
    first = next(items)  # request errors surface here, before anything is printed
    print("answer >> ", end="", flush=True)
    for item in itertools.chain([first], items):
        if isinstance(item, Chunk):
            print(item.text, end="", flush=True)
        else:
            if args.choices:
                print(
                    "\n"
                    + "  ".join(
                        f"{c}: {p:.3f}" for c, p in zip(args.choices, item.choice_probabilities)
                    ),
                    end="",
                )
            print(f"\n[{item.finish_reason}]")
            if lines := box_lines(item):
                print("\n".join(lines))
            elif args.ground:
                print(f"no box: the answer names no place for {args.ground!r}")
            if args.draw:
                draw_boxes(images[0], item.boxes, args.draw)
                print(f"boxes drawn on {args.draw}")
            print(f"\n{timing_table(item)}")
    return 0


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.segments < 1:
        ap.error("--segments must be >= 1")
    log_to_stderr(ap.prog)
    try:
        return run(args)
    except InternVLError as e:
        print(f"internvl-infer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
