"""``internvl-bench-serve``: N concurrent clients against an OpenAI-compatible server
(internvl-serve, vLLM), each asking an image question in a loop through the official ``openai``
client, streamed: requests/s over the run, and per request the time to the first token and the
decode tokens/s, as p50 / p95.

Every request sends a new picture (a drawn scene, PNG data URL: no server answers from a cache of
the last one) and the same question, and asks for a fixed number of tokens (``max_tokens``, greedy;
with ``--min-tokens`` also ``min_tokens``, so that an early end of text does not shorten an
answer), so runs on different servers compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np


def one_request(client, model: str, messages, tokens: int, extra: dict) -> dict:
    started = time.perf_counter()
    first = None
    pieces = 0
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra or None,
    )
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                pieces += 1
    ended = time.perf_counter()
    completion = usage.completion_tokens if usage else pieces
    # a model whose tokens have no text (random weights at real sizes pick ids past the test
    # tokenizer's) shows its answer only at the end: no time to the first token then
    timed = first is not None and pieces > 1
    return {
        "ttft_s": first - started if timed else None,
        "latency_s": ended - started,
        "completion_tokens": completion,
        "decode_tokens_per_s": (completion - 1) / (ended - first) if timed else None,
    }


def run(url: str, model: str, clients: int, requests: int, tokens: int, extra) -> dict:
    import openai

    from internvl_toy.scenes import Shape, render

    from ..remote import png_data_url

    def messages(client: int, request: int) -> list[dict]:
        # a new picture for every request: no server may answer from a cache of the last one
        x = 0.3 + 0.4 * ((client * requests + request) % 17) / 16
        image = render([Shape("circle", "red", x, 0.5, 0.2)], 320, 240)
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    {"type": "text", "text": "Describe the picture."},
                ],
            }
        ]

    results, errors = [], []
    lock = threading.Lock()

    def client_loop(index: int):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        for request in range(requests):
            try:
                r = one_request(client, model, messages(index, request), tokens, extra)
            except openai.OpenAIError as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started

    def pct(key, q):
        values = [r[key] for r in results if r[key] is not None]
        return float(np.percentile(values, q)) if values else None

    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors[:5],
        "error_count": len(errors),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "latency_s_p50": pct("latency_s", 50),
        "latency_s_p95": pct("latency_s", 95),
        "tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
        "ttft_s_p50": pct("ttft_s", 50),
        "ttft_s_p95": pct("ttft_s", 95),
        "decode_tokens_per_s_p50": pct("decode_tokens_per_s", 50),
        # 95 % of requests decoded at least this fast
        "decode_tokens_per_s_p95_low": pct("decode_tokens_per_s", 5),
        "completion_tokens_mean": float(np.mean([r["completion_tokens"] for r in results]))
        if results
        else 0.0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-bench-serve",
        description="Concurrent streamed image questions against an OpenAI-compatible server.",
        epilog="Example:\n  internvl-bench-serve --url http://127.0.0.1:8000/v1 --clients 1 4 16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--url", required=True, help="the server's base URL (.../v1)")
    ap.add_argument("--model", default="", help="model name (default: the first the server lists)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per answer (default 16)")
    ap.add_argument(
        "--min-tokens",
        action="store_true",
        help="send min_tokens = --tokens too (vLLM and internvl-serve take it): every answer as "
        "long",
    )
    ap.add_argument("--label", default="", help="a name for the server in the JSON")
    args = ap.parse_args(argv)
    import openai

    model = args.model or openai.OpenAI(base_url=args.url, api_key="none").models.list().data[0].id
    extra = {"min_tokens": args.tokens} if args.min_tokens else {}
    runs = []
    for n in args.clients:
        result = run(args.url, model, n, args.requests, args.tokens, extra)
        figures = ", ".join(
            f"{name} {result[key]:.{digits}f}"
            for name, key, digits in (
                ("req/s", "requests_per_s", 2),
                ("latency p50 s", "latency_s_p50", 2),
                ("p95", "latency_s_p95", 2),
                ("TTFT p50 s", "ttft_s_p50", 3),
                ("p95", "ttft_s_p95", 3),
                ("decode p50 tok/s", "decode_tokens_per_s_p50", 1),
            )
            if result[key] is not None
        )
        print(f"{n:>3} clients: {figures} ({result['error_count']} errors)", file=sys.stderr)
        runs.append(result)
    print(json.dumps({"server": args.label or args.url, "model": model, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
