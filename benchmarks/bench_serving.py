"""Serving under an open-loop Poisson load: (a) the unpatched model behind a dynamic batcher, (b)
the patched model behind the same batcher (compaction; answers when the batch ends), (c) the
depth-pooled engine (:class:`fastbert_kernels.serving.Engine`), at the same speed, in one run.

    python benchmarks/bench_serving.py [--requests 300] [--speed 0.8] [--loads 0.25 0.5 0.75 1.0]

Arrivals are a seeded Poisson process; the load levels are fractions of (b)'s saturation
throughput, measured first with every request queued at once (closed loop). Per system and load:
throughput, p50/p99 latency (submit to answer), and the mean rows per layer call. The checkpoint
defaults to the demo's distilled MiniLM on Rotten Tomatoes (run ``make demo`` first).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

import fastbert_kernels as fbk
from fastbert_kernels.apps.data import load_rotten_tomatoes
from fastbert_kernels.serving import Engine


class DynamicBatcher:
    """Collects requests until ``max_batch`` or ``max_wait`` seconds after the first, then runs
    ``run_batch(list of ids) -> list of (answer, layer calls made by the batch)`` on them."""

    def __init__(self, run_batch: Callable, max_batch: int = 64, max_wait: float = 0.01) -> None:
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait
        self.queue: list[tuple[list[int], concurrent.futures.Future]] = []
        self.cond = threading.Condition()
        self.closed = False
        self.layer_calls = 0
        self.layer_rows = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def submit(self, ids: list[int]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self.queue.append((ids, future))
            self.cond.notify()
        return future

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed and not self.queue:
                    return
                first = time.monotonic()
                while len(self.queue) < self.max_batch and not self.closed:
                    left = self.max_wait - (time.monotonic() - first)
                    if left <= 0:
                        break
                    self.cond.wait(left)
                batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            with torch.no_grad():
                answers, calls, rows = self.run_batch([ids for ids, _ in batch])
            self.layer_calls += calls
            self.layer_rows += rows
            for (_, future), answer in zip(batch, answers, strict=True):
                future.set_result(answer)


def padded(batch: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(map(len, batch))
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(batch), longest, dtype=torch.int64)
    for i, row in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def unpatched_runner(model, pad_id: int, num_layers: int) -> Callable:
    forward = type(model).forward

    def run(batch):
        logits = forward(model, **padded(batch, pad_id)).logits
        return list(logits.argmax(-1).tolist()), num_layers, num_layers * len(batch)

    return run


def patched_runner(model, pad_id: int, speed: float) -> Callable:
    def run(batch):
        out = model(**padded(batch, pad_id), speed=speed)
        layers = out.exit_layer.tolist()
        # The batch runs layer k on the rows still there: calls = the deepest exit.
        return list(out.logits.argmax(-1).tolist()), max(layers), sum(layers)

    return run


def drive(submit: Callable, requests: list[list[int]], rate: float | None, seed: int) -> dict:
    """Submits ``requests`` at Poisson arrival times (``rate`` per second; None: all at once) and
    waits for every answer; returns throughput and latency percentiles."""
    rng = random.Random(seed)
    latencies: list[float] = []
    lock = threading.Lock()
    futures = []
    begin = time.monotonic()
    arrival = begin
    for ids in requests:
        if rate is not None:
            arrival += rng.expovariate(rate)
            delay = arrival - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        submitted = time.monotonic()
        future = submit(ids)

        def done(_, submitted=submitted):
            with lock:
                latencies.append(time.monotonic() - submitted)

        future.add_done_callback(done)
        futures.append(future)
    for future in futures:
        future.result()
    span = time.monotonic() - begin
    latencies.sort()
    return {
        "throughput_per_s": len(requests) / span,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--speed", type=float, default=0.8)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    found = sorted(Path(".cache/fastbert_demo").glob("rotten_tomatoes-*/fastbert"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else (found[-1] if found else None)
    if checkpoint is None:
        print("no checkpoint: run `make demo` first or pass --checkpoint", file=sys.stderr)
        return 2
    model = fbk.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    texts = load_rotten_tomatoes().test.texts[: args.requests]
    requests = [tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    pad_id = tokenizer.pad_token_id or 0
    num_layers = model.config.num_hidden_layers
    wait = args.max_wait_ms / 1e3

    def systems():
        a = DynamicBatcher(unpatched_runner(model, pad_id, num_layers), args.max_batch, wait)
        b = DynamicBatcher(patched_runner(model, pad_id, args.speed), args.max_batch, wait)
        c = Engine(model, max_batch=args.max_batch)
        return {
            "a_unpatched_batcher": (a.submit, a.close, lambda: a.layer_rows / max(1, a.layer_calls)),
            "b_patched_batcher": (b.submit, b.close, lambda: b.layer_rows / max(1, b.layer_calls)),
            "c_engine": (
                lambda ids: c.submit(ids, speed=args.speed),
                c.close,
                lambda: sum(c.stats.layer_rows) / max(1, sum(c.stats.layer_calls)),
            ),
        }

    with torch.no_grad():
        model(**padded(requests[:8], pad_id), speed=args.speed)  # warm-up
    rows = []
    saturation = {}
    for name, (submit, close, fill) in systems().items():
        stats = drive(submit, requests, None, args.seed)
        close()
        saturation[name] = stats["throughput_per_s"]
        rows.append({"system": name, "load": "saturation", **stats, "rows_per_layer_call": fill()})
        print(rows[-1], flush=True)
    for load in args.loads:
        rate = load * saturation["b_patched_batcher"]
        for name, (submit, close, fill) in systems().items():
            stats = drive(submit, requests, rate, args.seed)
            close()
            rows.append({"system": name, "load": load, "rate_per_s": rate, **stats, "rows_per_layer_call": fill()})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(checkpoint), "speed": args.speed, "max_batch": args.max_batch,
              "threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    (out / "serving.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
