"""Serving under an open-loop Poisson load: (a) the unpatched model behind a dynamic batcher, (b)
the patched model behind the same batcher (compaction; answers when the batch ends), (c) the
depth-pooled engine (:class:`fastbert_kernels.serving.Engine`), at the same speed, in one run.

    python benchmarks/bench_serving.py [--requests 300] [--speed 0.8] [--loads 0.25 0.5 0.75 1.0]
        [--engine-waits-ms 25 50 100 250]

Arrivals are a seeded Poisson process; the load levels are fractions of (b)'s saturation
throughput, measured first with every request queued at once (closed loop). Per system and load:
throughput, p50/p99 latency (submit to answer), and the mean rows per layer call. Then, at 75%
load, the engine's policies and its aging bound ``max_wait`` swept over ``--engine-waits-ms``
(3 seeds each). The checkpoint
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
from demo_checkpoint import load_checkpoint

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


# A GPU projection, a simulation until measured: per-layer latency of BERT-base on an A100 by batch
# size, from TensorRT's published per-sample figures (0.62 ms a sample at batch 1, 0.12 ms at batch
# 64, 12 layers), as an affine model t(b) = fixed + b * per_row fitted through the two points.
A100_LAYER_MS_BATCH_1 = 0.62 / 12
A100_LAYER_MS_BATCH_64 = 0.12 * 64 / 12


def layer_ms(rows: int) -> float:
    per_row = (A100_LAYER_MS_BATCH_64 - A100_LAYER_MS_BATCH_1) / 63
    return A100_LAYER_MS_BATCH_1 + (rows - 1) * per_row


def project_gpu(exit_layers: list[int], num_layers: int, max_batch: int) -> dict:
    """Replays the measured exit layers through (a) static batches, (b) static batches with
    compaction and (c) the depth-pooled scheduler (fullest depth first), all requests queued at
    once, with :func:`layer_ms` per layer call; returns each one's speed-up over (a) and the ideal."""
    n = len(exit_layers)
    batches = [exit_layers[i : i + max_batch] for i in range(0, n, max_batch)]
    unpatched = sum(num_layers * layer_ms(len(b)) for b in batches)
    compacted = sum(layer_ms(sum(1 for e in b if e > k)) for b in batches for k in range(max(b)))
    pools = [0] * num_layers  # rows waiting at each depth
    leaving = [[0] * (num_layers + 1) for _ in range(num_layers)]  # per depth: rows by exit layer
    for e in exit_layers:
        leaving[0][e] += 1
        pools[0] += 1
    engine = 0.0
    while any(pools):
        depth = max(range(num_layers), key=lambda d: (pools[d], d))
        take = min(max_batch, pools[depth])
        engine += layer_ms(take)
        # The rows taken are a proportional share of the pool's exit layers (exits are per row).
        taken = _take(leaving[depth], take)
        pools[depth] -= take
        for e, count in enumerate(taken):
            leaving[depth][e] -= count
            if e > depth + 1 and depth + 1 < num_layers:
                leaving[depth + 1][e] += count
                pools[depth + 1] += count
    ideal = num_layers * n / sum(exit_layers)
    return {
        "layer_ms_model": "affine through A100 BERT-base, TensorRT published: 0.62 ms/sample at batch 1, 0.12 at 64",
        "ideal_layer_speedup": ideal,
        "b_static_compacted_speedup": unpatched / compacted,
        "c_engine_speedup": unpatched / engine,
    }


def _take(counts: list[int], take: int) -> list[int]:
    """``take`` rows from a pool with ``counts[e]`` rows of each exit layer, oldest layers first
    (any order gives the same totals at saturation; this one is deterministic)."""
    taken = [0] * len(counts)
    for e, count in enumerate(counts):
        step = min(count, take)
        taken[e] = step
        take -= step
        if take == 0:
            break
    return taken


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
    parser.add_argument("--seeds", type=int, default=3, help="arrival sequences per load level (medians reported)")
    parser.add_argument("--engine-waits-ms", type=float, nargs="*", default=[25.0, 50.0, 100.0, 250.0],
                        help="the engine's aging bounds to sweep at 75%% load")  # fmt: skip
    parser.add_argument("--merge-gaps", type=int, nargs="*", default=[1, 2, 3], help="the engine's merge gaps to sweep")
    parser.add_argument("--sweep-seeds", type=int, default=5, help="arrival sequences of the 75%% sweep")
    parser.add_argument("--only-engine-sweep", action="store_true", help="measure (b)'s saturation and the sweep only")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    loaded = load_checkpoint(args.checkpoint)
    if loaded is None:
        print("no checkpoint: run `make demo` first or pass --checkpoint", file=sys.stderr)
        return 2
    model, tokenizer, checkpoint = loaded
    texts = load_rotten_tomatoes().test.texts[: args.requests]
    requests = [tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    pad_id = tokenizer.pad_token_id or 0
    num_layers = model.config.num_hidden_layers
    wait = args.max_wait_ms / 1e3

    def engine_system(policy: str, max_wait: float | None = None, merge_gap: int | None = None):
        options = {} if max_wait is None else {"max_wait": max_wait}
        options |= {} if merge_gap is None else {"merge_gap": merge_gap}
        c = Engine(model, max_batch=args.max_batch, policy=policy, **options)
        return (
            lambda ids: c.submit(ids, speed=args.speed),
            c.close,
            lambda: sum(c.stats.layer_rows) / max(1, sum(c.stats.layer_calls)),
        )

    def systems():
        a = DynamicBatcher(unpatched_runner(model, pad_id, num_layers), args.max_batch, wait)
        b = DynamicBatcher(patched_runner(model, pad_id, args.speed), args.max_batch, wait)
        return {
            "a_unpatched_batcher": (a.submit, a.close, lambda: a.layer_rows / max(1, a.layer_calls)),
            "b_patched_batcher": (b.submit, b.close, lambda: b.layer_rows / max(1, b.layer_calls)),
            "c_engine": engine_system("fullest"),
        }

    with torch.no_grad():
        model(**padded(requests[:8], pad_id), speed=args.speed)  # warm-up
    rows = []
    saturation = {}
    for name, (submit, close, fill) in systems().items():
        if args.only_engine_sweep and name != "b_patched_batcher":
            continue
        stats = drive(submit, requests, None, 0)
        close()
        saturation[name] = stats["throughput_per_s"]
        rows.append({"system": name, "load": "saturation", **stats, "rows_per_layer_call": fill()})
        print(rows[-1], flush=True)
    for load in [] if args.only_engine_sweep else args.loads:
        rate = load * saturation["b_patched_batcher"]
        for seed in range(args.seeds):
            for name, (submit, close, fill) in systems().items():
                stats = drive(submit, requests, rate, seed)
                close()
                rows.append({"system": name, "load": load, "seed": seed, "rate_per_s": rate, **stats,
                             "rows_per_layer_call": fill()})  # fmt: skip
                print(rows[-1], flush=True)
    # The engine's other policies, aging bounds and merge gaps at 75% of (b)'s saturation,
    # interleaved with (b) itself and the default engine on the same arrival sequences.
    variants = [(f"c_engine_{policy}", policy, None, None) for policy in ("deepest", "oldest")]
    variants += [(f"c_engine_wait{ms:g}ms", "fullest", ms / 1e3, None) for ms in args.engine_waits_ms]
    variants += [(f"c_engine_merge{gap}", "fullest", None, gap) for gap in args.merge_gaps]
    rate = 0.75 * saturation["b_patched_batcher"]
    for seed in range(args.sweep_seeds):
        b = DynamicBatcher(patched_runner(model, pad_id, args.speed), args.max_batch, wait)
        sweep = {"b_patched_batcher_sweep": (b.submit, b.close, lambda b=b: b.layer_rows / max(1, b.layer_calls))}
        sweep |= {"c_engine_sweep": engine_system("fullest")}
        sweep |= {name: engine_system(*options) for name, *options in variants}
        for name, (submit, close, fill) in sweep.items():
            stats = drive(submit, requests, rate, 100 + seed)
            close()
            rows.append({"system": name, "load": 0.75, "seed": seed, "rate_per_s": rate, **stats,
                         "rows_per_layer_call": fill()})  # fmt: skip
            print(rows[-1], flush=True)
    with torch.no_grad():
        exit_layers = []
        for i in range(0, len(requests), args.max_batch):
            out = model(**padded(requests[i : i + args.max_batch], pad_id), speed=args.speed)
            exit_layers += out.exit_layer.tolist()
    projection = project_gpu(exit_layers, num_layers, args.max_batch)
    print("GPU projection (simulated):", projection)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(checkpoint), "speed": args.speed, "max_batch": args.max_batch,
              "threads": torch.get_num_threads(), "rows": rows, "gpu_projection_simulated": projection}  # fmt: skip
    summary = summarize(rows)
    name = "serving_sweep.json" if args.only_engine_sweep else "serving.json"
    (out / name).write_text(json.dumps({**result, "summary": summary}, indent=1))
    for line in summary:
        print(line)
    if not args.only_engine_sweep:
        plot(summary, out / "serving_latency.png", args)
    return 0


def summarize(rows: list[dict]) -> list[dict]:
    """Per system and load: the medians over seeds of throughput, p50, p99 and rows per call."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["load"]), []).append(row)
    keys = ("throughput_per_s", "p50_ms", "p99_ms", "rows_per_layer_call")
    return [
        {
            "system": system,
            "load": load,
            "rate_per_s": group[0].get("rate_per_s"),
            "seeds": len(group),
            **{k: statistics.median(r[k] for r in group) for k in keys},
        }
        for (system, load), group in groups.items()
    ]


def plot(rows: list[dict], path: Path, args) -> None:
    """p50 and p99 latency against offered load, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"a_unpatched_batcher": "unpatched, dynamic batcher", "b_patched_batcher": "FastBERT, dynamic batcher",
              "c_engine": "FastBERT, depth-pooled engine"}  # fmt: skip
    for system, label in labels.items():
        points = sorted((r["rate_per_s"], r["p50_ms"], r["p99_ms"]) for r in rows
                        if r["system"] == system and r["load"] != "saturation")  # fmt: skip
        if points:
            line = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{label}, p50")[0]
            ax.plot([p[0] for p in points], [p[2] for p in points], "--", color=line.get_color(), label=f"{label}, p99")
    ax.set_xlabel("offered load (requests/s, Poisson)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"Serving at speed {args.speed}, max batch {args.max_batch}, CPU {torch.get_num_threads()} threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
