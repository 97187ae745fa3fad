"""Load test of `teal serve`: Llama-3-8B shape, random bf16 weights, 1 / 4 / 16 concurrent streaming clients, dense
and at 50 %; the decode bench's tok/s of the same generator in the same run beside the 1-client figure.

The server (`teal.serve.create_app` under uvicorn, in a thread of this process) serves the engine built as
`teal bench decode --shape llama-3-8b` builds it (random weights, max_seq_len for prompt + new tokens, 50 %:
thresholds at the quantiles of |x| over a random prompt); the load generator is an httpx asyncio script in a
child process (its own interpreter, so it takes no GIL from the server). Each client sends streaming
/v1/completions requests one after another (a prompt of random token ids, greedy, ignore_eos, so every
request decodes exactly --new-tokens tokens). Per setting: time to first token (request sent -> first text
chunk; includes the time queued behind the other clients), tok/s per stream (text chunks - 1 over the
first-to-last chunk time; one chunk per token: a random shape has no tokenizer, each token is the text
"[id]"), aggregate tok/s (all completion tokens over the wall time of the setting), the engine's own decode
tok/s (the `teal` object of each response), the measured decode sparsity, and errors (HTTP errors, broken
or short streams; must be 0). At 1 client: `teal.bench.decode.time_engine` on the same generator first.

GPU (the image lacks fastapi / uvicorn / pydantic: carry the wheels, docs/serve.md lists them):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .gpu/wheels-serve/*.whl
    cd .gpu/serve && PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site \\
        python3 benchmarks/scripts/serve_load_gpu.py --json $OUT/serve-load.json

CPU smoke test: ``--shape tiny-llama --device cpu --dtype float32 --prompt-len 16 --new-tokens 8``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

REQUESTS_AT_ONE_CLIENT = 3  # sequential requests of the single client (the bench's 3 repeats)


# ---- the load generator (child process: only httpx) ---------------------------------------------
async def _one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = last = None
    chunks, final, done = 0, None, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return {"error": f"stream error: {event['error']}"}
                now = time.perf_counter()
                if event["choices"] and event["choices"][0]["text"]:
                    first = first or now
                    last = now
                    chunks += 1
                if event.get("usage"):
                    final = event
    except Exception as err:  # noqa: BLE001 - every failure of a request is counted, the others go on
        return {"error": f"{type(err).__name__}: {err}"}
    tokens = final["usage"]["completion_tokens"] if final else 0
    if not done or final is None or tokens != body["max_tokens"] or chunks != tokens:
        return {"error": f"incomplete stream: done={done}, completion_tokens={tokens}, text chunks={chunks}, "
                         f"expected {body['max_tokens']}"}
    return {"ttft_s": first - t0, "stream_tokens_per_s": (chunks - 1) / (last - first) if chunks > 1 else None,
            "tokens": tokens, "end": last, "start": t0, "teal": final.get("teal", {})}


async def _level(url: str, clients: int, rounds: int, make_body: Any) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        async def client_loop(c: int) -> list[dict[str, Any]]:
            return [await _one(client, url, make_body(c, r)) for r in range(rounds)]

        start = time.perf_counter()
        results = [r for per in await asyncio.gather(*(client_loop(c) for c in range(clients))) for r in per]
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    streams = [r["stream_tokens_per_s"] for r in ok if r["stream_tokens_per_s"]]
    teal = [r["teal"] for r in ok]
    return {
        "clients": clients, "requests": len(results), "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if "error" in r})[:5],
        "ttft_s_median": med([r["ttft_s"] for r in ok]), "ttft_s_max": max((r["ttft_s"] for r in ok), default=None),
        "stream_tokens_per_s_median": med(streams), "stream_tokens_per_s_min": min(streams, default=None),
        "aggregate_tokens_per_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
        "engine_decode_tokens_per_s_median": med([t.get("decode_tokens_per_s") for t in teal
                                                  if t.get("decode_tokens_per_s")]),
        "measured_decode_sparsity_median": med([t["decode_sparsity"] for t in teal
                                                if t.get("decode_sparsity") is not None]),
        "probe_s_median": med([t.get("probe_s", 0.0) for t in teal]),
        "queue_s_max": max((t.get("queue_s", 0.0) for t in teal), default=None),
    }


def load_main(args: argparse.Namespace) -> None:
    """Child process: every concurrency level against the server at args.url; one JSON line out."""
    import random

    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        rounds = REQUESTS_AT_ONE_CLIENT if clients == 1 else 1

        def make_body(c: int, r: int, clients: int = clients) -> dict[str, Any]:
            rng = random.Random(1000 * clients + 10 * c + r)  # a different prompt for every request
            return {"model": args.model, "prompt": [rng.randrange(args.vocab) for _ in range(args.prompt_len)],
                    "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}

        rows.append(asyncio.run(_level(args.url, clients, rounds, make_body)))
        print(f"  {clients:2d} clients: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(json.dumps(rows))


# ---- the server side (parent process) -----------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--shape", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sparsity", default="0,0.5")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--prompt-len", type=int, default=128)  # teal bench decode's defaults
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--bench-repeats", type=int, default=3)
    parser.add_argument("--load", dest="url", help=argparse.SUPPRESS)  # child mode: the server's URL
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.url:
        load_main(args)
        return
    if not args.json_path:
        parser.error("--json PATH is required")

    import torch
    import uvicorn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _gpu_run import run_info
    from teal.bench.results import write_json
    from teal.bench.timing import time_engine
    from teal.engine import Generator
    from teal.engine.reference import activation_threshold_levels
    from teal.serve import ServedModel, create_app

    t_start = time.time()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    levels = [float(s) for s in args.sparsity.split(",")]
    max_seq_len = -(-(args.prompt_len + args.new_tokens + 8) // 64) * 64  # as teal bench decode
    gen = Generator.from_pretrained(args.shape, device=device, dtype=dtype, max_seq_len=max_seq_len)
    engine = gen.engine
    if any(s > 0 for s in levels) and not engine.transposed:
        engine.to_layout(transposed=True)  # the sparse kernel's layout (already so where the CUDA kernel runs)
    vocab = engine.config.vocab_size
    calib = torch.randint(0, vocab, (args.prompt_len,), device=device,
                          generator=torch.Generator(device=device).manual_seed(2))
    thresholds = dict(zip(levels, activation_threshold_levels(engine, calib, levels)))
    bench_ids = torch.randint(0, vocab, (args.prompt_len,), device=device,
                              generator=torch.Generator(device=device).manual_seed(0))
    served = ServedModel(gen, args.shape)
    data: dict[str, Any] = {
        **run_info(device), "benchmark": "serve-load", "shape": args.shape, "dtype": args.dtype,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "max_seq_len": max_seq_len,
        "clients": args.clients, "requests_at_one_client": REQUESTS_AT_ONE_CLIENT,
        "probe_steps": served.probe_steps, "thresholds_source": "quantiles of |x| over a random prompt",
        "rows": [], "errors": [],
    }
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(served, warmup=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        for s in levels:
            if s > 0:
                gen.set_sparsity(s, thresholds[s])
            else:
                gen.set_sparsity(0.0)
            served.sparsity = s
            t = time.perf_counter()
            bench = time_engine(gen, bench_ids, args.new_tokens, args.bench_repeats)  # graphs captured here
            print(f"s={s:g}: decode bench {bench['tokens_per_s']:.1f} tok/s ({gen.mode}; compile + capture "
                  f"{bench['capture_s']:.1f} s, {time.perf_counter() - t:.1f} s in all)", flush=True)
            child = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--load", url, "--model", args.shape, "--vocab",
                 str(vocab), "--clients", args.clients, "--prompt-len", str(args.prompt_len), "--new-tokens",
                 str(args.new_tokens)], capture_output=True, text=True, timeout=1800)
            sys.stderr.write(child.stderr)
            if child.returncode != 0:
                data["errors"].append(f"s={s}: load generator exited {child.returncode}: {child.stderr[-500:]}")
                write_json(data, args.json_path)
                continue
            for row in json.loads(child.stdout.strip().splitlines()[-1]):
                row = {"sparsity": s, "engine_mode": gen.mode, **row}
                if row["clients"] == 1:
                    row["bench_decode_tokens_per_s"] = bench["tokens_per_s"]
                    row["bench_decode_tokens_per_s_runs"] = bench["tokens_per_s_runs"]
                    if row["stream_tokens_per_s_median"]:
                        row["stream_vs_bench"] = row["stream_tokens_per_s_median"] / bench["tokens_per_s"]
                data["rows"].append(row)
            write_json(data, args.json_path)  # after every setting: a run cut short keeps what it measured
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    one = [r for r in data["rows"] if r["clients"] == 1 and r.get("stream_vs_bench")]
    data["total_errors"] = sum(r["errors"] for r in data["rows"]) + len(data["errors"])
    data["targets"] = {
        "errors_zero": data["total_errors"] == 0,
        "one_client_within_5pct_of_bench": bool(one) and all(r["stream_vs_bench"] >= 0.95 for r in one),
    }
    data["total_s"] = time.time() - t_start
    write_json(data, args.json_path)
    print_table(data)


def print_table(data: dict[str, Any]) -> None:
    def f(v: Any, spec: str) -> str:
        return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(int(spec.split(".")[0]))

    print(f"\n{data['shape']} {data['dtype']} on {data['device']}: prompt {data['prompt_len']}, "
          f"{data['new_tokens']} new tokens per request, greedy streaming /v1/completions")
    head = (f"{'sparsity':>8} {'measured':>8} {'clients':>7} {'reqs':>4} {'err':>3} {'TTFT med':>8} {'TTFT max':>8} "
            f"{'tok/s/stream':>12} {'aggregate':>9} {'engine':>7} {'bench':>7} {'stream/bench':>12}")
    print(head)
    print("-" * len(head))
    for r in data["rows"]:
        print(f"{r['sparsity']:8.2f} {f(r['measured_decode_sparsity_median'], '8.3f')} {r['clients']:7d} "
              f"{r['requests']:4d} {r['errors']:3d} {f(r['ttft_s_median'], '8.3f')} {f(r['ttft_s_max'], '8.3f')} "
              f"{f(r['stream_tokens_per_s_median'], '12.1f')} {f(r['aggregate_tokens_per_s'], '9.1f')} "
              f"{f(r['engine_decode_tokens_per_s_median'], '7.1f')} {f(r.get('bench_decode_tokens_per_s'), '7.1f')} "
              f"{f(r.get('stream_vs_bench'), '12.3f')}")
    print(f"errors: {data['total_errors']}; targets: {json.dumps(data['targets'])}; total {data['total_s']:.0f} s")


if __name__ == "__main__":
    main()
