"""Write the GGUF files ``internvl-bench --contexts ... --gguf`` times llama.cpp on: the
checkpoint's Qwen2 decoder converted by llama.cpp's own ``convert_hf_to_gguf.py`` (F32, Q8_0), and
Q4_0 quantised from the F32 file by llama.cpp itself (llama-cpp-python's ``llama_model_quantize``,
llama-quantize's defaults); with ``--mmproj``, the vision encoder and projector as the same
converter writes them for llama.cpp's mtmd (``--mmproj``: F16, Q8_0), which
``internvl-bench --compare llama.cpp`` times.

Needs: llama.cpp's source tree for its converter (``--llama-cpp``: ``vendor/llama.cpp`` of the
llama-cpp-python sdist, ``pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36``), its
gguf-py (``pip install <tree>/gguf-py``), sentencepiece, torch and transformers, and
llama-cpp-python for Q4_0 (``pip install llama-cpp-python==0.3.36``: it compiles llama.cpp,
minutes).

llama.cpp's converter recognises a tokenizer by hashing what its pre-tokenizer makes of a test
text, and refuses one it does not know. The random checkpoints the tests and benchmarks build have a
small tokenizer of their own, so the converter is told to write Qwen2's pre-tokenizer name (as a
real InternVL2.5-1B checkpoint's tokenizer would hash to); the decoder benchmark feeds token ids,
so tokenization is never timed there. The converter also looks the projector's layers up by
their index (the last is 3) in its table of the ViT's blocks, which the tests' 2-layer ViT is too
short for: the table is made at least 4 blocks long (a real checkpoint's 24 are unchanged).

    python scripts/make_gguf.py --hf-model real/hf \\
        --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp --out real/gguf
    # writes real/gguf/qwen2-f32.gguf, -q8_0.gguf, -q4_0.gguf (and with --mmproj,
    # real/gguf/mmproj-f16.gguf, -q8_0.gguf)
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

from internvl_engine.tools.peers import export_qwen2

CONVERT = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
name_map = conversion.base.gguf.get_tensor_name_map
conversion.base.gguf.get_tensor_name_map = lambda arch, blocks: name_map(arch, max(blocks, 4))
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def convert(
    llama_cpp_dir: Path, model: Path, outtype: str, out: Path, mmproj: bool = False
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            CONVERT,
            str(llama_cpp_dir),
            str(model),
            *(["--mmproj"] if mmproj else []),
            "--outtype",
            outtype,
            "--outfile",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        raise SystemExit(
            f"make_gguf: llama.cpp's converter failed for {out.name}:\n{run.stderr[-2000:]}"
        )


def quantize_q4_0(f32: Path, out: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)):
        raise SystemExit(f"make_gguf: llama.cpp could not quantise {f32} to Q4_0")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hf-model", required=True, type=Path, help="original InternVL2.5 checkpoint")
    ap.add_argument(
        "--llama-cpp",
        required=True,
        type=Path,
        help="llama.cpp source tree (convert_hf_to_gguf.py)",
    )
    ap.add_argument(
        "--out", required=True, type=Path, help="directory for qwen2-{f32,q8_0,q4_0}.gguf"
    )
    ap.add_argument(
        "--mmproj",
        action="store_true",
        help="also the vision encoder and projector, as llama.cpp's mtmd reads them: "
        "mmproj-{f16,q8_0}.gguf (internvl-bench --compare llama.cpp)",
    )
    args = ap.parse_args()
    if not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        ap.error(f"{args.llama_cpp} has no convert_hf_to_gguf.py")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        qwen2 = export_qwen2(args.hf_model, Path(scratch) / "qwen2")
        for outtype in ("f32", "q8_0"):
            convert(args.llama_cpp, qwen2, outtype, args.out / f"qwen2-{outtype}.gguf")
    quantize_q4_0(args.out / "qwen2-f32.gguf", args.out / "qwen2-q4_0.gguf")
    if args.mmproj:  # the converter reads the whole checkpoint and keeps its vision side
        for outtype in ("f16", "q8_0"):
            convert(
                args.llama_cpp, args.hf_model, outtype, args.out / f"mmproj-{outtype}.gguf", True
            )
    for path in sorted(args.out.glob("*.gguf")):
        print(f"{path}: {path.stat().st_size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
