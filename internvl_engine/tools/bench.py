"""``internvl-bench``: the seed's timing table for the engine and, with ``--compare transformers``,
for transformers' InternVL on the same checkpoint, in the same run, with the ratios; with
``--compare openvino``, the image encoder beside OpenVINO's fp32 and NNCF int8 of the same ViT;
with ``--compare llama.cpp``, the image question (pictures to first token) beside llama.cpp's mtmd
on ``--gguf`` and each ``--mmproj`` (both in peer_vit.py); with ``--contexts``, the decoder alone
side by side with the runtimes a user would pick instead on a CPU.

Seed table: each runtime runs in its own child process (so peak RSS is its own), on the same
prompts: the question plus 0, 1, 4 ... random 640x480 images, one tile each, as the seed's table.
Per image count: warm-up runs, then ``--repeats`` measured runs; every figure is reported as the
median with its spread (min and max), and the JSON holds every single measurement. Per decode step
it also reports the host overhead (wall time minus the time inside backend calls) and the bytes
handed to the backend, and per image count the TTFT of a second question about the same images
with and without prefix reuse. The transformers side is fp32 eager attention, as the reference
tests use it; it needs torch and transformers (``requirements/dev.txt``).

Decoder comparison (``--contexts 384 2000``): every model directory, and with ``--compare`` the
peers of ``peers.py`` (onnxruntime-genai built from the same checkpoint, llama.cpp on ``--gguf``
files, transformers), each in its own child process that stays up for the whole run, take turns
round by round (so a slow spell of the machine hits them all): a prompt of random token ids of
each context length, then ``--decode-tokens`` greedy steps. Reported: prefill time, decode
tokens/s at each length, the weights a decode step reads and the memory bandwidth that makes, as a
share of what this machine reads at most (measured first), and each engine directory's ratio to
every peer of the same precision.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import InternVLError
from ..session import thread_count

QUESTION = "Describe the images in detail."
SECOND_QUESTION = "What colour dominates the images?"


def worker_pool() -> ProcessPoolExecutor:
    """One child process for one runtime. A runtime that crashes in its native code (a segfault, an
    illegal instruction) kills the child without a Python exception: faulthandler prints the stack
    it died in to the bench's stderr, and ``failure`` says what happened."""
    return ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=faulthandler.enable)


def failure(e: Exception) -> str:
    """What went wrong in a worker, for one line of the bench's output."""
    if isinstance(e, BrokenProcessPool):  # the child is gone: nothing came back but that
        return "its process died (a crash in native code, its stack above, or killed for memory)"
    return f"{type(e).__name__}: {e}"


def bench_images(count: int) -> list[np.ndarray]:
    return [
        np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        for i in range(count)
    ]


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux keeps ``ru_maxrss`` across exec, so a spawned
    child would report its parent's peak when that is higher; VmHWM belongs to this process
    image."""
    status = Path("/proc/self/status")
    if status.is_file():
        return (
            next(
                int(line.split()[1])
                for line in status.read_text().splitlines()
                if line.startswith("VmHWM")
            )
            / 1024
        )
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS: bytes


def engine_runs(
    model_dir: str,
    hf_model: str | None,
    vit_model: str | None,
    backend: str,
    threads: int | None,
    image_counts: list[int],
    decode_tokens: int,
    repeats: int,
    warmup: int,
) -> dict:
    from ..engine import Engine, Request, argmax, generate_step

    engine = Engine(
        model_dir, backend=backend, threads=threads, tokenizer_dir=hf_model, vit_model=vit_model
    )
    llm = engine.llm
    results = {}
    for count in image_counts:
        images = bench_images(count)
        runs = []
        for repeat in range(warmup + repeats):
            started = time.perf_counter()
            prompt = engine.prepare(Request(QUESTION, images=images))
            generation = generate_step(llm, prompt.embeds, argmax, reuse_prefix=False)
            ttft = next(generation).seconds
            question_ttft = time.perf_counter() - started  # pictures to first token
            decode = [next(generation) for _ in range(decode_tokens)]
            generation.close()
            steps = [s.seconds for s in decode]
            overhead = [s.seconds - s.backend_seconds for s in decode]
            moved = [s.bytes_moved for s in decode]
            second = engine.prepare(Request(SECOND_QUESTION, images=images))
            started = time.perf_counter()
            llm.prefill(second.embeds, reuse_prefix=True)
            ttft_reuse, reused = time.perf_counter() - started, llm.reused
            started = time.perf_counter()
            llm.prefill(second.embeds, reuse_prefix=False)
            ttft_no_reuse = time.perf_counter() - started
            if repeat < warmup:
                continue
            decode = statistics.median(steps)
            runs.append(
                {
                    "vit_ms": sum(prompt.vit_ms),
                    "ttft_ms": ttft * 1e3,
                    "question_ttft_ms": question_ttft * 1e3,
                    "prefill_tokens": len(prompt.token_ids),
                    "decode_ms_per_token": decode * 1e3,
                    "tokens_per_s": 1 / decode,
                    "host_overhead_ms": statistics.median(overhead) * 1e3,
                    "host_overhead_pct": 100 * statistics.median(overhead) / decode,
                    "bytes_per_token": statistics.median(moved),
                    "second_question_ttft_ms": ttft_reuse * 1e3,
                    "second_question_ttft_no_reuse_ms": ttft_no_reuse * 1e3,
                    "second_question_reused_tokens": reused,
                    "second_question_tokens": len(second.token_ids),
                }
            )
        results[count] = runs
    return {"runs": results, "peak_rss_mb": peak_rss_mb(), "backend": engine.backend}


def transformers_runs(
    hf_model: str,
    threads: int,
    image_counts: list[int],
    decode_tokens: int,
    repeats: int,
    warmup: int,
) -> dict:
    import warnings

    import torch

    from ..config import DEFAULT_SYSTEM_PROMPT, ModelSpec, read_hf_config
    from ..preprocess import normalize, tiles
    from ..prompt import IMG_CONTEXT, Tokenizer
    from .reference import load_reference

    # transformers' past_key_values rename
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(threads)
    spec = ModelSpec.from_hf_config(read_hf_config(Path(hf_model)))
    tok = Tokenizer(Path(hf_model))
    model = load_reference(Path(hf_model), tok.ids[IMG_CONTEXT])
    results = {}
    with torch.no_grad():
        for count in image_counts:
            ids = torch.tensor(
                [
                    tok.encode_chat(
                        DEFAULT_SYSTEM_PROMPT, QUESTION, [1] * count, spec.num_image_token
                    )
                ]
            )
            pixels = [
                torch.from_numpy(normalize(tiles(im, spec.image_size, 1)))
                for im in bench_images(count)
            ]
            runs = []
            for repeat in range(warmup + repeats):
                started = time.perf_counter()
                features = [
                    model.model.get_image_features(
                        pixel_values=p,
                        vision_feature_layer=-1,
                        vision_feature_select_strategy="default",
                    ).pooler_output
                    for p in pixels
                ]
                vit = time.perf_counter() - started
                embeds = model.get_input_embeddings()(ids)
                if features:
                    embeds[ids == tok.ids[IMG_CONTEXT]] = torch.cat(
                        [f.reshape(-1, f.shape[-1]) for f in features]
                    )
                started = time.perf_counter()
                out = model(inputs_embeds=embeds, use_cache=True)
                token = out.logits[0, -1].argmax()
                ttft = time.perf_counter() - started
                past, steps = out.past_key_values, []
                for _ in range(decode_tokens):
                    started = time.perf_counter()
                    out = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[0, -1].argmax()
                    steps.append(time.perf_counter() - started)
                if repeat >= warmup:
                    decode = statistics.median(steps)
                    runs.append(
                        {
                            "vit_ms": vit * 1e3,
                            "ttft_ms": ttft * 1e3,
                            "prefill_tokens": ids.shape[1],
                            "decode_ms_per_token": decode * 1e3,
                            "tokens_per_s": 1 / decode,
                        }
                    )
            results[count] = runs
    return {
        "runs": results,
        "peak_rss_mb": peak_rss_mb(),
        "backend": f"torch {torch.__version__} fp32 eager",
    }


def openvino_runs(
    hf_model: str,
    precision: str,
    threads: int,
    image_counts: list[int],
    repeats: int,
    warmup: int,
) -> dict:
    """OpenVINO's ViT (peer_vit.py) on the same pictures' tiles: the image encoder's time only."""
    from ..config import ModelSpec, read_hf_config
    from .peer_vit import CALIBRATION_TILES, OpenVinoVit, one_tile_each

    size = ModelSpec.from_hf_config(read_hf_config(Path(hf_model))).image_size
    calibration = one_tile_each(
        [
            np.random.default_rng(1000 + i).integers(0, 256, (480, 640, 3), dtype=np.uint8)
            for i in range(CALIBRATION_TILES)
        ],
        size,
    )
    vit = OpenVinoVit(Path(hf_model), precision, threads, calibration)
    results = {}
    for count in image_counts:
        pixels = one_tile_each(bench_images(count), size)
        runs = []
        for repeat in range(warmup + repeats):
            started = time.perf_counter()
            for tile in pixels:
                vit.run(tile)
            if repeat >= warmup:
                runs.append({"vit_ms": (time.perf_counter() - started) * 1e3})
        results[count] = runs
    return {
        "runs": results,
        "peak_rss_mb": peak_rss_mb(),
        "backend": vit.label + (f", quantised in {vit.quantize_s:.0f} s" if vit.quantize_s else ""),
    }


def llama_cpp_runs(
    hf_model: str,
    gguf: str,
    mmproj: str,
    threads: int,
    image_counts: list[int],
    repeats: int,
    warmup: int,
) -> dict:
    """llama.cpp's image question (peer_vit.py) on the same pictures, each given as the one tile
    the engine encodes: the vision encoder's time and the question's time to first token."""
    from ..config import ModelSpec, read_hf_config
    from ..preprocess import tiles
    from .peer_vit import LlamaCppMtmd

    spec = ModelSpec.from_hf_config(read_hf_config(Path(hf_model)))
    peer = LlamaCppMtmd(Path(gguf), Path(mmproj), threads)
    results = {}
    try:
        for count in image_counts:
            tile_list = [tiles(image, spec.image_size, 1)[0] for image in bench_images(count)]
            runs = []
            for repeat in range(warmup + repeats):
                asked = peer.ask(QUESTION, tile_list)
                # per tile or not at all: llama.cpp slices a picture by its own rules
                if asked["image_tokens"] != count * spec.num_image_token:
                    raise InternVLError(
                        f"llama.cpp made {asked['image_tokens']} image tokens of {count} "
                        f"tiles, not {spec.num_image_token} each: not the engine's work"
                    )
                if repeat >= warmup:
                    runs.append(
                        {
                            "vit_ms": asked["vit_s"] * 1e3,
                            "question_ttft_ms": asked["ttft_s"] * 1e3,
                            "prefill_tokens": asked["prompt_tokens"],
                        }
                    )
            results[count] = runs
    finally:
        peer.close()
    return {"runs": results, "peak_rss_mb": peak_rss_mb(), "backend": peer.label}


def image_peers(report: dict) -> list[str]:
    return [n for n in report["runtimes"] if n.startswith(("openvino", "llama.cpp"))]


def vit_ratios(report: dict) -> dict:
    """Per engine runtime and image count: each image peer's ViT time over the engine's (above 1:
    the engine is faster)."""
    return peer_ratios(report, "vit_ms", image_peers(report))


def ttft_ratios(report: dict) -> dict:
    """The same for the image question's time to first token (pictures to token: preprocessing,
    ViT and prefill), against llama.cpp."""
    return peer_ratios(
        report, "question_ttft_ms", [n for n in image_peers(report) if n.startswith("llama.cpp")]
    )


def peer_ratios(report: dict, key: str, peers: list[str]) -> dict:
    not_engines = {"transformers", *image_peers(report)}
    out = {}
    for name, result in report["runtimes"].items():
        if name in not_engines:
            continue
        out[name] = {
            count: {
                peer: report["runtimes"][peer]["summary"][count][key]["median"] / s[key]["median"]
                for peer in peers
            }
            for count, s in result["summary"].items()
            if s[key]["median"]
        }
    return out


def summary(runs: list[dict]) -> dict:
    """Median, min and max of every figure over the repeats."""
    return {
        k: {
            "median": statistics.median(r[k] for r in runs),
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in runs[0]
    }


def cell(s: dict, key: str, digits: int = 1) -> str:
    m = s[key]
    spread = (m["max"] - m["min"]) / 2
    return f"{m['median']:.{digits}f} ±{spread:.{digits}f}"


def tables(report: dict) -> str:
    out = []
    for name, result in report["runtimes"].items():
        if name.startswith("openvino"):
            out += [
                f"\n{name} ({result['backend']}, peak RSS {result['peak_rss_mb']:.0f} MB)",
                "",
                "| Image num | ImageEncoder ms |",
                "|---|---|",
                *(f"| {c} | {cell(s, 'vit_ms')} |" for c, s in result["summary"].items()),
            ]
            continue
        if name.startswith("llama.cpp"):
            out += [
                f"\n{name} ({result['backend']}, peak RSS {result['peak_rss_mb']:.0f} MB)",
                "",
                "| Image num | ImageEncoder ms | Question TTFT ms (tokens) |",
                "|---|---|---|",
                *(
                    f"| {c} | {cell(s, 'vit_ms')} | {cell(s, 'question_ttft_ms')} "
                    f"({int(s['prefill_tokens']['median'])}) |"
                    for c, s in result["summary"].items()
                ),
            ]
            continue
        out += [
            f"\n{name} ({result['backend']}, peak RSS {result['peak_rss_mb']:.0f} MB)",
            "",
            "| Image num | ImageEncoder ms | Prefill TTFT ms (tokens) | Decoder ms/token | "
            "tokens/s |",
            "|---|---|---|---|---|",
        ]
        for count, s in result["summary"].items():
            out.append(
                f"| {count} | {cell(s, 'vit_ms')} | {cell(s, 'ttft_ms')} "
                f"({int(s['prefill_tokens']['median'])}) "
                f"| {cell(s, 'decode_ms_per_token', 2)} | {cell(s, 'tokens_per_s', 2)} |"
            )
        if "host_overhead_ms" in next(iter(result["summary"].values())):
            out += [
                "",
                "| Image num | host overhead ms/step (%) | bytes to backend /step | 2nd question "
                "TTFT ms: "
                "reuse (tokens reused) | no reuse |",
                "|---|---|---|---|---|",
            ]
            for count, s in result["summary"].items():
                out.append(
                    f"| {count} | {cell(s, 'host_overhead_ms', 3)} "
                    f"({s['host_overhead_pct']['median']:.2f} %) "
                    f"| {s['bytes_per_token']['median']:.0f} | "
                    f"{cell(s, 'second_question_ttft_ms')} "
                    f"({int(s['second_question_reused_tokens']['median'])}/"
                    f"{int(s['second_question_tokens']['median'])}) | "
                    f"{cell(s, 'second_question_ttft_no_reuse_ms')} |"
                )
    for key, figure, what in (
        ("vit_ratios", "vit_ms", "image encoder"),
        ("ttft_ratios", "question_ttft_ms", "image question, pictures to first token"),
    ):
        for name, by_count in report.get(key, {}).items():
            peers = list(next(iter(by_count.values()), {}))
            own = report["runtimes"][name]["summary"]
            out += [
                "",
                f"ratio {name} vs its peers, {what} (peer time / {name} time: above 1, "
                f"{name} is faster)",
                "",
                f"| Image num | {name} ms | " + " | ".join(peers) + " |",
                "|---|---|" + "---|" * len(peers),
                *(
                    f"| {c} | {cell(own[c], figure)} | "
                    + " | ".join(f"{r[p]:.2f}x" for p in peers)
                    + " |"
                    for c, r in by_count.items()
                ),
            ]
    if "transformers" in report["runtimes"]:
        for name, result in report["runtimes"].items():
            if name == "transformers" or name in image_peers(report):
                continue
            out += [
                "",
                f"ratio {name} vs transformers (speed-up: transformers time / {name} time; "
                "tokens/s: "
                f"{name} / transformers)",
                "",
                "| Image num | ImageEncoder | Prefill TTFT | Decoder ms/token | tokens/s |",
                "|---|---|---|---|---|",
            ]
            for count, s in result["summary"].items():
                r = report["ratios"][name][count]
                x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
                out.append(
                    f"| {count} | {x(r['vit_ms'])} | {x(r['ttft_ms'])} | "
                    f"{x(r['decode_ms_per_token'])} "
                    f"| {x(r['tokens_per_s'])} |"
                )
    return "\n".join(out)


def ratios(report: dict) -> dict:
    base = report["runtimes"]["transformers"]["summary"]
    out = {}
    for name, result in report["runtimes"].items():
        if name == "transformers" or name in image_peers(report):
            continue
        out[name] = {}
        for count, s in result["summary"].items():
            b = base[count]
            speedup = lambda k: b[k]["median"] / s[k]["median"] if s[k]["median"] else None  # noqa: E731
            out[name][count] = {
                "vit_ms": speedup("vit_ms"),
                "ttft_ms": speedup("ttft_ms"),
                "decode_ms_per_token": speedup("decode_ms_per_token"),
                "tokens_per_s": s["tokens_per_s"]["median"] / b["tokens_per_s"]["median"],
            }
    return out


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "internvl-bench: error: --plot needs matplotlib (requirements/dev.txt)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [n for n in report["runtimes"] if n not in image_peers(report)]  # no decode
    for name in names:
        s = report["runtimes"][name]["summary"]
        counts = [int(c) for c in s]
        left.errorbar(
            counts,
            [s[c]["ttft_ms"]["median"] for c in s],
            yerr=[
                [s[c]["ttft_ms"]["median"] - s[c]["ttft_ms"]["min"] for c in s],
                [s[c]["ttft_ms"]["max"] - s[c]["ttft_ms"]["median"] for c in s],
            ],
            marker="o",
            capsize=3,
            label=name,
        )
    left.set(
        xlabel="images (one tile each)",
        ylabel="prefill TTFT, ms",
        title="Time to first token",
        xticks=sorted({int(c) for n in names for c in report["runtimes"][n]["summary"]}),
    )
    left.legend()
    left.grid(alpha=0.3)
    first = str(min(int(c) for c in report["runtimes"][names[0]]["summary"]))
    rates = [report["runtimes"][n]["summary"][first]["tokens_per_s"]["median"] for n in names]
    right.bar(names, rates, color=[f"C{i}" for i in range(len(names))])
    for i, r in enumerate(rates):
        right.text(i, r, f"{r:.1f}", ha="center", va="bottom")
    right.set(ylabel="tokens/s", title=f"Decode speed ({first} images)")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(report["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


_decoder = None  # the peers.Decoder of a decoder-comparison child process


def decoder_round(
    kind: str, loader_args: tuple, contexts: list[int], decode_tokens: int, vocab: int, seed: int
) -> dict:
    """One round in a child process (the first loads the runtime): per context length, a prompt of
    that many random ids below ``vocab``, then ``decode_tokens`` greedy steps (their median time is
    the decode speed at that length)."""
    global _decoder
    if _decoder is None:
        from . import peers

        _decoder = {
            "engine": peers.EngineDecoder,
            "onnxruntime-genai": peers.GenaiDecoder,
            "llama.cpp": peers.LlamaCppDecoder,
            "transformers": peers.TransformersDecoder,
        }[kind](*loader_args)
    rng = np.random.default_rng(seed)
    out = {
        "label": _decoder.label,
        "precision": _decoder.precision,
        "weights_bytes": _decoder.weights_bytes,
        "contexts": {},
    }
    for context in contexts:
        ids = rng.integers(0, vocab, context).tolist()
        started = time.perf_counter()
        token = _decoder.prefill(ids)
        prefill = time.perf_counter() - started
        steps = []
        for _ in range(decode_tokens):
            started = time.perf_counter()
            token = _decoder.decode(token)
            steps.append(time.perf_counter() - started)
        out["contexts"][str(context)] = {
            "prefill_ms": prefill * 1e3,
            "tokens_per_s": 1 / statistics.median(steps),
        }
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def memory_bandwidth(threads: int, size_mb: int = 1024) -> float:
    """GB/s this machine reads at most with ``threads`` threads, each taking the maximum of
    its share of a buffer far larger than the caches (numpy lets go of the GIL meanwhile; best of
    10): the bound for a decode step, which reads every weight once. Not a sum: numpy's pairwise
    summation is compute-bound on some CPUs (7 GB/s a thread on an Intel Xeon whose memory gives
    12), where its maximum is one vectorised compare per element."""
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(np.ones(size_mb * 2**18, np.float32), threads)
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(10):
            started = time.perf_counter()
            list(pool.map(np.max, parts))
            times.append(time.perf_counter() - started)
    return size_mb * 2**20 / min(times) / 1e9


def decoder_runtimes(args) -> list[tuple[str, str, tuple]]:
    """(name, kind, loader arguments) of every runtime the comparison runs."""
    from importlib.util import find_spec

    from ..config import Manifest

    context = max(args.contexts) + args.decode_tokens + 16
    manifests = {d: Manifest.read(d) for d in args.model_dir}
    for d, m in manifests.items():
        if m.build.max_prompt_tokens < max(args.contexts) or m.build.kv_cache_len < context:
            raise InternVLError(
                f"{d} takes prompts of at most {m.build.max_prompt_tokens} tokens and "
                f"{m.build.kv_cache_len} in its cache; a prompt of {max(args.contexts)} then "
                f"{args.decode_tokens} steps needs an export with --max-prompt-tokens "
                f"{max(args.contexts)} --kv-cache-len {context} or more"
            )
    engines = [(d, m.source.get("precision", "fp32")) for d, m in manifests.items()]
    runtimes = [(d.name, "engine", (str(d), args.threads)) for d, _ in engines]
    compare = args.compare or []
    if "onnxruntime-genai" in compare:
        if not find_spec("onnxruntime_genai"):
            raise InternVLError(
                "--compare onnxruntime-genai needs onnxruntime-genai and onnx-ir "
                "(requirements/dev.txt)"
            )
        from .peers import build_genai

        for precision in dict.fromkeys(p for _, p in engines):
            built = build_genai(args.hf_model, precision, args.peers_dir, args.threads)
            runtimes.append(
                (
                    f"onnxruntime-genai {precision}",
                    "onnxruntime-genai",
                    (str(built), precision, args.threads, context),
                )
            )
    for gguf in args.gguf or []:
        if not gguf.is_file():
            raise InternVLError(f"{gguf}: no such GGUF file")
        if not find_spec("llama_cpp"):
            raise InternVLError(
                "--gguf needs llama-cpp-python (pip install llama-cpp-python: it compiles "
                "llama.cpp, "
                "which takes minutes)"
            )
        runtimes.append((f"llama.cpp {gguf.stem}", "llama.cpp", (str(gguf), args.threads, context)))
    if "transformers" in compare:
        from .peers import export_qwen2

        qwen2 = export_qwen2(args.hf_model, args.peers_dir / "qwen2")
        runtimes.append(("transformers", "transformers", (str(qwen2), args.threads)))
    return runtimes


def compare_decoders(args) -> dict:
    from ..config import Manifest

    runtimes = decoder_runtimes(args)
    vocab = Manifest.read(args.model_dir[0]).spec.text.vocab_size
    bandwidth = memory_bandwidth(args.threads)
    report = {
        "machine": machine(),
        "bandwidth_gb_s": bandwidth,
        "settings": {
            "contexts": args.contexts,
            "decode_tokens": args.decode_tokens,
            "rounds": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
        },
        "runtimes": {},
    }
    pools = {name: worker_pool() for name, *_ in runtimes}
    rounds = {name: [] for name in pools}
    try:
        for r in range(args.warmup + args.repeats):
            for name, kind, loader_args in runtimes:  # one at a time: the others wait
                try:
                    result = (
                        pools[name]
                        .submit(
                            decoder_round,
                            kind,
                            loader_args,
                            args.contexts,
                            args.decode_tokens,
                            vocab,
                            r,
                        )
                        .result()
                    )
                except Exception as e:
                    raise InternVLError(f"{name}: {failure(e)}") from e
                if r >= args.warmup:
                    rounds[name].append(result)
            print(f"round {r + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    finally:
        for pool in pools.values():
            pool.shutdown()
    for name, kind, _ in runtimes:
        runs = rounds[name]
        report["runtimes"][name] = {
            "kind": kind,
            **{k: runs[0][k] for k in ("label", "precision", "weights_bytes")},
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "runs": [r["contexts"] for r in runs],
            "summary": {
                c: summary([r["contexts"][c] for r in runs]) for c in map(str, args.contexts)
            },
        }
    # a shared machine's bandwidth drifts: measured before and after, the larger is the limit
    report["bandwidth_gb_s"] = max(bandwidth, memory_bandwidth(args.threads))
    report["ratios"] = decoder_ratios(report)
    return report


def decoder_ratios(report: dict) -> dict:
    """Each engine directory against every peer of its precision: the peer's prefill time over the
    engine's, the engine's decode speed over the peer's (above 1: the engine is faster)."""
    runtimes = report["runtimes"]
    engines = {n: r for n, r in runtimes.items() if r["kind"] == "engine"}
    out = {}
    for name, engine in engines.items():
        for peer_name, peer in runtimes.items():
            if peer_name in engines or peer["precision"] != engine["precision"]:
                continue
            out[f"{name} vs {peer_name}"] = {
                c: {
                    "prefill": peer["summary"][c]["prefill_ms"]["median"]
                    / engine["summary"][c]["prefill_ms"]["median"],
                    "decode": engine["summary"][c]["tokens_per_s"]["median"]
                    / peer["summary"][c]["tokens_per_s"]["median"],
                }
                for c in engine["summary"]
            }
    return out


def decoder_tables(report: dict) -> str:
    contexts = list(next(iter(report["runtimes"].values()))["summary"])
    first, last = contexts[0], contexts[-1]
    bandwidth = report["bandwidth_gb_s"]
    out = [
        f"memory read at most: {bandwidth:.1f} GB/s ({report['settings']['threads']} threads)",
        "",
        f"| runtime | weights read per token MB | prefill {first} tokens ms | "
        + " | ".join(f"decode tok/s at {c}" for c in contexts)
        + (f" | {last} vs {first} |" if len(contexts) > 1 else " |")
        + f" weights GB/s at {first} (% of limit) |",
        "|---" * (4 + len(contexts) + (len(contexts) > 1)) + "|",
    ]
    for name, r in report["runtimes"].items():
        s, mb = r["summary"], r["weights_bytes"] / 1e6
        rate = s[first]["tokens_per_s"]["median"]
        row = [f"{name}: {r['label']}", f"{mb:.1f}", cell(s[first], "prefill_ms", 0)]
        row += [cell(s[c], "tokens_per_s", 1) for c in contexts]
        if len(contexts) > 1:
            row.append(f"{s[last]['tokens_per_s']['median'] / rate:.2f}")
        row.append(f"{mb * rate / 1e3:.1f} ({100 * mb * rate / 1e3 / bandwidth:.0f} %)")
        out.append("| " + " | ".join(row) + " |")
    if report["ratios"]:
        out += [
            "",
            "ratios (prefill: the peer's time / the engine's; decode: the engine's tokens/s / the "
            "peer's)",
            "",
            "| engine vs peer (same precision) | prefill "
            + first
            + " | "
            + " | ".join(f"decode at {c}" for c in contexts)
            + " |",
            "|---" * (2 + len(contexts)) + "|",
        ]
        for pair, by_context in report["ratios"].items():
            out.append(
                f"| {pair} | {by_context[first]['prefill']:.2f}x | "
                + " | ".join(f"{by_context[c]['decode']:.2f}x" for c in contexts)
                + " |"
            )
    return "\n".join(out)


def machine() -> str:
    import os
    import platform

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else ""
    )
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def as_json(value):
    """A setting as the report holds it: paths as text, in lists too (--model-dir, --gguf)."""
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time the engine on a model directory as the seed's table does (image encoder, "
        "time to\n"
        "first token, decode speed for 0, 1, 4 ... images), with host overhead and bytes per "
        "decode\n"
        "step; with --compare transformers, also transformers' InternVL on the same checkpoint, "
        "in\n"
        "the same run, with the ratios.\n\n"
        "With --contexts, time the decoder alone at those context lengths instead (a prompt of "
        "random\n"
        "token ids, then greedy steps), side by side with onnxruntime-genai (its builder's model "
        "of the\n"
        "same checkpoint, one per precision of the model directories), llama.cpp (--gguf files) "
        "and\n"
        "transformers, round by round, with the memory bandwidth each decode step uses.",
        epilog="Examples:\n"
        "  internvl-bench --model-dir model --hf-model ckpt --images 0 1 4 --compare transformers "
        "--plot bench.png\n"
        "  internvl-bench --model-dir model-int4 model-int8 --hf-model ckpt --contexts 384 2000 "
        "\\\n"
        "      --compare onnxruntime-genai --gguf q8_0.gguf q4_0.gguf --repeats 10",
    )
    ap.add_argument(
        "--model-dir",
        "--model_dir",
        nargs="+",
        required=True,
        type=Path,
        help="model directories to time (several: e.g. an fp32 and an int8 export)",
    )
    ap.add_argument(
        "--hf-model",
        "--hf_model",
        type=Path,
        help="original checkpoint: the transformers and onnxruntime-genai side, and "
        "config/tokenizer "
        "for seed directories",
    )
    ap.add_argument(
        "--vit-model", "--vit_model", type=Path, help="ViT model file (seed directories)"
    )
    ap.add_argument(
        "--images", nargs="+", type=int, default=[0, 1, 4], help="image counts (default 0 1 4)"
    )
    ap.add_argument(
        "--contexts",
        nargs="+",
        type=int,
        help="time the decoder alone with prompts of these many tokens (e.g. 384 2000)",
    )
    ap.add_argument(
        "--decode-tokens", type=int, default=32, help="decode steps timed per run (default 32)"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measured runs per image count, or rounds with --contexts (default 3)",
    )
    ap.add_argument(
        "--warmup", type=int, default=1, help="unmeasured runs (rounds) first (default 1)"
    )
    ap.add_argument(
        "--compare",
        nargs="+",
        choices=["transformers", "onnxruntime-genai", "openvino", "llama.cpp"],
        help="also time transformers' InternVL; openvino: OpenVINO's fp32 and NNCF int8 on the "
        "same ViT (the image encoder only; requirements/peers-image.txt); llama.cpp: its mtmd "
        "image question on --gguf (the decoder) with each --mmproj; with --contexts "
        "onnxruntime-genai",
    )
    ap.add_argument(
        "--gguf",
        nargs="+",
        type=Path,
        help="llama.cpp (llama-cpp-python) GGUF files of the decoder: with --contexts, each timed; "
        "with --compare llama.cpp, the one its image questions run on",
    )
    ap.add_argument(
        "--mmproj",
        nargs="+",
        type=Path,
        help="with --compare llama.cpp: the vision GGUFs (scripts/make_gguf.py --mmproj: F16, "
        "Q8_0), each timed beside --gguf",
    )
    ap.add_argument(
        "--peers-dir",
        type=Path,
        help="where onnxruntime-genai's models are built and kept (default: a temporary directory)",
    )
    ap.add_argument("--backend", default="auto")
    ap.add_argument(
        "--threads",
        type=int,
        help="CPU threads of every runtime (default, or 0: every core this process may use, within "
        "its CPU quota)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    ap.add_argument(
        "--plot", type=Path, help="write a PNG: TTFT against image count, decode tokens/s"
    )
    args = ap.parse_args(argv)
    if args.compare and not args.hf_model:
        ap.error(f"--compare {' '.join(args.compare)} needs --hf-model")
    if (
        args.decode_tokens < 1
        or args.repeats < 1
        or args.warmup < 0
        or min(args.images) < 0
        or (args.threads or 0) < 0
    ):
        ap.error(
            "--decode-tokens and --repeats must be >= 1, --warmup, --images and --threads >= 0"
        )
    # one count for every runtime: their own defaults differ (onnxruntime-genai's ran on 1 of this
    # box's 2 cores, at 0.6 of its decode speed on 2)
    args.threads = thread_count(args.threads)
    if args.contexts:
        if min(args.contexts) < 1:
            ap.error("--contexts must be >= 1")
        if args.plot:
            ap.error("--plot draws TTFT against image count: not with --contexts")
        for image_peer in ("openvino", "llama.cpp"):
            if image_peer in (args.compare or []):
                ap.error(f"--compare {image_peer} times the image path: not with --contexts")
        if args.mmproj:
            ap.error("--mmproj is llama.cpp's image path: with --compare llama.cpp, not --contexts")
        return compare_main(args)
    if "onnxruntime-genai" in (args.compare or []):
        ap.error("onnxruntime-genai takes token ids, not images: time it with --contexts")
    if "llama.cpp" in (args.compare or []):
        if not args.gguf or len(args.gguf) != 1 or not args.mmproj:
            ap.error("--compare llama.cpp needs one --gguf (the decoder) and --mmproj files")
        for path in args.gguf + args.mmproj:
            if not path.is_file():
                ap.error(f"{path}: no such GGUF file")
        from .peer_vit import llama_cpp_missing

        if why := llama_cpp_missing():
            ap.error(f"--compare llama.cpp: {why}")
    elif args.gguf or args.mmproj:
        ap.error(
            "--gguf times llama.cpp's decoder with --contexts, or its image path with --compare "
            "llama.cpp and --mmproj"
        )
    report = {
        "machine": machine(),
        "settings": {
            k: as_json(v)
            for k, v in vars(args).items()
            if k not in ("json", "plot", "contexts", "peers_dir")
        },
        "runtimes": {},
    }
    common = (args.images, args.decode_tokens, args.repeats, args.warmup)
    jobs = [
        (
            d.name if len(args.model_dir) > 1 else "engine",
            engine_runs,
            (
                str(d),
                args.hf_model and str(args.hf_model),
                args.vit_model and str(args.vit_model),
                args.backend,
                args.threads,
                *common,
            ),
        )
        for d in args.model_dir
    ]
    if "transformers" in (args.compare or []):
        jobs.append(
            ("transformers", transformers_runs, (str(args.hf_model), args.threads, *common))
        )
    if "openvino" in (args.compare or []):
        from .peer_vit import openvino_missing

        if why := openvino_missing():
            ap.error(f"--compare openvino: {why}")
        for precision in ("fp32", "int8"):
            jobs.append(
                (
                    f"openvino {precision}",
                    openvino_runs,
                    (
                        str(args.hf_model),
                        precision,
                        args.threads,
                        args.images,
                        args.repeats,
                        args.warmup,
                    ),
                )
            )
    if "llama.cpp" in (args.compare or []):
        for mmproj in args.mmproj:
            jobs.append(
                (
                    f"llama.cpp {mmproj.stem}",
                    llama_cpp_runs,
                    (
                        str(args.hf_model),
                        str(args.gguf[0]),
                        str(mmproj),
                        args.threads,
                        args.images,
                        args.repeats,
                        args.warmup,
                    ),
                )
            )
    for name, fn, fn_args in jobs:  # one at a time, each in a fresh process
        with worker_pool() as pool:
            try:
                result = pool.submit(fn, *fn_args).result()
            except Exception as e:
                print(f"internvl-bench: error: {name}: {failure(e)}", file=sys.stderr)
                return 2
        result["summary"] = {str(c): summary(runs) for c, runs in result["runs"].items()}
        result["runs"] = {str(c): runs for c, runs in result["runs"].items()}
        report["runtimes"][name] = result
        if not args.json:
            print(f"{name}: done", file=sys.stderr, flush=True)
    if "transformers" in (args.compare or []):
        report["ratios"] = ratios(report)
    if {"openvino", "llama.cpp"} & set(args.compare or []):
        report["vit_ratios"] = vit_ratios(report)
    if "llama.cpp" in (args.compare or []):
        report["ttft_ratios"] = ttft_ratios(report)
    if args.plot:
        plot(report, args.plot)
    print(json.dumps(report, indent=1) if args.json else f"{report['machine']}\n{tables(report)}")
    return 0


def compare_main(args) -> int:
    with tempfile.TemporaryDirectory(prefix="internvl-bench-") as scratch:
        args.peers_dir = args.peers_dir or Path(scratch)
        try:
            report = compare_decoders(args)
        except (InternVLError, ImportError, OSError) as e:
            print(f"internvl-bench: error: {e}", file=sys.stderr)
            return 2
    print(
        json.dumps(report, indent=1)
        if args.json
        else f"{report['machine']}\n{decoder_tables(report)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
