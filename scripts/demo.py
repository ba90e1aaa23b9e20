"""The demo behind ``make demo``: build a tiny random checkpoint, export it, and ask internvl-infer
a text question and a question about a generated image. Random weights give random words: the
point is the whole path (checkpoint -> export -> engine -> streamed answer -> timing table)."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".demo"
BIN = Path(sys.executable).parent


def run(*cmd) -> None:
    print(f"\n$ {shlex.join(str(c) for c in cmd)}", flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def main() -> int:
    hf, model = WORK / "tiny", WORK / "tiny_onnx"
    if not (model / "manifest.json").is_file():
        run(BIN / "internvl-make-tiny", "--out", hf)
        run(BIN / "internvl-export", "--hf-model", hf, "--out", model)
    image = WORK / "red_circle.png"
    canvas = np.full((480, 640, 3), 255, np.uint8)
    cv2.circle(canvas, (320, 240), 120, (0, 0, 255), -1)  # BGR: red
    cv2.imwrite(str(image), canvas)
    run(BIN / "internvl-infer", "--model-dir", model, "-q", "Hello! Who are you?", "--max-new-tokens", "24")
    run(BIN / "internvl-infer", "--model-dir", model, "-q", "What color is the shape?", "-i", image,
        "--max-new-tokens", "24")
    return 0


if __name__ == "__main__":
    sys.exit(main())
