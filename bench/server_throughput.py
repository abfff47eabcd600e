"""`forge serve-chat` throughput on the CPU: new tokens/s at 1, 4 and 16 concurrent clients.

The real command serves a small GPT (random weights: speed does not depend on them, and they
almost never end an answer early, so every request makes exactly --new-tokens tokens) on a
free loopback port. For each concurrency c, c clients start together, each streaming one
/v1/completions request (its own prompt, greedy) to `data: [DONE]`; a round's throughput is
all the new tokens (the servers' usage counts) over the wall time from the first request to
the last [DONE]. Time to first token is per client. Concurrencies are interleaved across
repetitions; medians are reported.

A second server with --max-batch 1 answers one request at a time: the same load at the highest
concurrency shows what batching (concurrent clients sharing forward passes) buys.

Run: .venv/bin/python bench/server_throughput.py [--preset small --new-tokens 32 --repeats 3]
     ->  bench/results/server_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, RESULTS, VOCAB_DIR, machine_info, median, print_table, rotated, write_json

from model.server import MAX_BATCH, WINDOW_S


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model.gpt preset (default small)")
    parser.add_argument("--clients", default="1,4,16", help="concurrencies (default 1,4,16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="per request (default 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared box)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS / "server_throughput.json"))
    return parser.parse_args(argv)


def make_checkpoint(preset: str, folder: Path) -> tuple[Path, dict]:
    import torch

    from model.checkpoint import PRETRAIN_FORMAT, CheckpointManager
    from model.gpt import GPT
    from model.gpt_config import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset))
    config = dataclasses.asdict(model.config)
    state = {"format": PRETRAIN_FORMAT, "version": 1, "step": 0, "model": model.state_dict(),
             "model_config": config}
    return CheckpointManager(folder).save(0, state), config


class Server:
    """A `forge serve-chat` subprocess on a free port."""

    def __init__(self, checkpoint: Path, threads: int, device: str, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve-chat", str(checkpoint), "--port", "0",
             "--device", device, "--vocab-dir", str(VOCAB_DIR), *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines = []
        while "chat page" not in (line := self.proc.stdout.readline()):
            lines.append(line)
            if not line:
                raise RuntimeError("serve-chat did not start:\n" + "".join(lines))
        url = line.split("chat page ")[1].split()[0].rstrip("/")
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stream(self, prompt: str, new_tokens: int) -> dict:
        """One streamed completion: its new tokens and its time to first token."""
        body = {"model": "forge", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, usage = None, None
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()!r}")
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
        finally:
            conn.close()
        return {"tokens": usage["completion_tokens"], "ttft_s": first}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_round(server: Server, clients: int, new_tokens: int, rep: int) -> dict:
    """clients concurrent streams started together: total new tokens over the wall time."""
    results: list[dict | None] = [None] * clients
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        start.wait()
        results[i] = server.stream(f"Request {rep}-{i}: tell me about the number {i * 37}.",
                                   new_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(r is None for r in results):
        raise RuntimeError("a client failed")
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "wall_s": round(wall, 4), "new_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2),
            "median_ttft_s": round(median(r["ttft_s"] for r in results if r["ttft_s"]), 4)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    concurrencies = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, config = make_checkpoint(args.preset, Path(tmp))
        batched = Server(checkpoint, args.threads, args.device)
        single = Server(checkpoint, args.threads, args.device, "--max-batch", "1")
        sides = {f"batched:{c}": (batched, c) for c in concurrencies}
        top = max(concurrencies)
        sides[f"one-at-a-time:{top}"] = (single, top)
        try:
            for server in (batched, single):
                run_round(server, 1, 4, -1)  # warm-up: first requests pay lazy imports
            runs: dict[str, list[dict]] = {name: [] for name in sides}
            for rep in range(args.repeats):
                for name in rotated(list(sides), rep):
                    server, clients = sides[name]
                    runs[name].append(run_round(server, clients, args.new_tokens, rep))
                    print(f"  {name}: {runs[name][-1]['tokens_per_s']} tokens/s", flush=True)
        finally:
            batched.close()
            single.close()

    figures = {
        name: {"clients": sides[name][1],
               "max_batch": 1 if name.startswith("one") else MAX_BATCH,
               "median_tokens_per_s": median(r["tokens_per_s"] for r in rs),
               "median_wall_s": median(r["wall_s"] for r in rs),
               "median_ttft_s": median(r["median_ttft_s"] for r in rs),
               "runs": rs}
        for name, rs in runs.items()
    }
    base = figures[f"batched:{concurrencies[0]}"]["median_tokens_per_s"]
    rows = [[name, f["clients"], f["max_batch"], f"{f['median_tokens_per_s']:.1f}",
             f"{f['median_tokens_per_s'] / base:.2f}x", f"{f['median_ttft_s']:.3f}",
             f"{f['median_wall_s']:.2f}"] for name, f in figures.items()]
    print_table(
        f"forge serve-chat, {args.preset} ({config['n_layer']} layers, width {config['n_embd']}),"
        f" {args.new_tokens} new tokens per request, {args.device}, {args.threads} thread(s)",
        ["side", "clients", "max batch", "tokens/s", f"vs {concurrencies[0]} client",
         "TTFT s", "round s"], rows)
    write_json(Path(args.out), {
        "benchmark": "server_throughput",
        "machine": machine_info(["torch", "fastapi", "uvicorn"]),
        "inputs": {"preset": args.preset, "model_config": config, "new_tokens": args.new_tokens,
                   "concurrencies": concurrencies, "repeats": args.repeats,
                   "threads": args.threads, "device": args.device, "window_s": WINDOW_S},
        "figures": figures,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
