"""The GPU check: one command that validates and measures the GPU path on a machine with a GPU.

    make gpu-check                       # builds the extension in place, then runs this
    python benchmarks/gpu_check.py --out DIR [--skip-tests]
    python benchmarks/gpu_check.py --device cpu --quick --skip-tests   # smoke run, no GPU needed

It runs the test suite (which parametrises every backend over CUDA when CUDA exists), times both
ops per backend with CUDA events, times the end-to-end model against the unpatched Hugging Face
model in the same process (random weights of the MiniLM and BERT-base shapes: the GPU machines
have no network and the packaged weights do not travel), and counts host syncs and kernel
launches per layer. Everything lands in one report, ``gpu_check.json`` and ``gpu_check.md``.
Sized to finish within 8 minutes on one H100-class GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import fastbert_kernels as fbk
from fastbert_kernels import ops
from fastbert_kernels.branch import BranchClassifier
from fastbert_kernels.calibration import exit_profile
from fastbert_kernels.ops.sync_counter import counting

ROOT = Path(__file__).resolve().parents[1]
# (name, layers, hidden, heads, intermediate): the packaged MiniLM's shape and BERT-base's.
SHAPES = [("minilm-l6", 6, 384, 12, 1536), ("bert-base", 12, 768, 12, 3072)]
QUICK_SHAPES = [("tiny", 4, 64, 4, 128)]


def measure(fn, device: torch.device, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median and spread of ``fn``'s wall-clock in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - begin))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


# The suites that run every backend on every device present (CUDA included on a GPU machine); the
# rest (AOT compilation, distributed CPU jobs, CLI) does not depend on the GPU and CI runs it.
DEVICE_SUITES = [
    "tests/test_ops.py",
    "tests/test_model.py",
    "tests/test_hf_integration.py",
    "tests/test_architectures.py",
]


def run_tests(timeout: int) -> dict:
    command = [sys.executable, "-m", "pytest", *DEVICE_SUITES, "-q", "-p", "no:cacheprovider"]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"timed out after {timeout} s"}
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return {"returncode": result.returncode, "summary": lines[-1] if lines else result.stderr[-500:]}


def _branch(h: int, r: int, c: int, device) -> BranchClassifier:
    """A branch scaled so that its answers are confident enough to split a batch."""
    branch = BranchClassifier(h, c, r).to(device).eval()
    with torch.no_grad():
        for p in branch.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return branch


def time_ops(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    rows = []
    sizes = [(8, 16, 64, 2)] if quick else [(64, 128, 768, 2), (64, 128, 768, 77), (1, 32, 384, 2), (64, 64, 384, 1000)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for n, s, h, c in sizes:
            hidden = torch.randn(n, s, h, device=device).to(dtype)
            lengths = torch.randint(1, s + 1, (n,), device=device)
            mask = (torch.arange(s, device=device)[None, :] < lengths[:, None]).long()
            folded = _branch(h, 128, c, device).folded_weights(dtype)
            rows_index = torch.arange(n, device=device)
            keep = torch.rand(n, device=device) < 0.5
            for name, backend in ops.BACKENDS.items():
                if not ops.backends._runs(backend, device.type):
                    continue
                os.environ[ops.ENV_VAR] = name
                head = measure(functools.partial(ops.exit_head, hidden, mask, folded, 2, 0.5), device, repeats)
                # The margin criterion at T = 0.5 with a patience state: what the other rules cost.
                streak = torch.zeros(n, 2, dtype=torch.int64, device=device)
                ruled = functools.partial(ops.exit_head, hidden, mask, folded, 2, 0.5, "margin", 0.5, 2, streak)
                head_ruled = measure(ruled, device, repeats)
                pack = measure(functools.partial(ops.compact, hidden, mask, rows_index, keep, True), device, repeats)
                os.environ.pop(ops.ENV_VAR)
                shape = {"dtype": str(dtype).replace("torch.", ""), "n": n, "s": s, "h": h, "c": c}
                rows.append({"op": "exit_head", "backend": name, **shape, **head})
                rows.append({"op": "exit_head margin T=0.5 patience 2", "backend": name, **shape, **head_ruled})
                rows.append({"op": "compact", "backend": name, **shape, **pack})
    return rows


def random_model(shape, device: torch.device, num_labels: int = 2) -> BertForSequenceClassification:
    _, layers, hidden, heads, intermediate = shape
    config = BertConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        num_labels=num_labels,
        attn_implementation="sdpa",
    )
    return BertForSequenceClassification(config).to(device).eval()


def review_like_lengths(count: int, limit: int) -> torch.Tensor:
    """Token counts drawn like Rotten Tomatoes snippets' (mean about 27, long right tail)."""
    lengths = torch.distributions.LogNormal(math.log(24.0), 0.5).sample((count,)).round().long()
    return lengths.clamp(4, limit)


def make_batch(lengths: torch.Tensor, device: torch.device, vocab: int) -> dict[str, torch.Tensor]:
    s = int(lengths.max())
    ids = torch.randint(1000, vocab, (len(lengths), s))
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}


def spread_students(model) -> None:
    """Random students with confident-ish outputs, so that exits spread over the layers."""
    with torch.no_grad():
        for branch in fbk.students(model):
            for p in branch.parameters():
                p.normal_(0, 2.0 / p.shape[-1] ** 0.5)


def forward_all(model, batches: list[dict[str, torch.Tensor]], speed: float | None = None) -> None:
    """The model on every batch: unpatched (``speed`` None) or at ``speed``."""
    for batch in batches:
        model(**batch) if speed is None else model(**batch, speed=speed)


@torch.no_grad()
def time_end_to_end(device: torch.device, quick: bool, repeats: int) -> list[dict]:
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        model = random_model(shape, device)
        num_layers = shape[1]
        for batch_size in (1, 64) if not quick else (1, 8):
            samples = 16 if batch_size == 1 else batch_size
            lengths = review_like_lengths(samples, 128)
            batches = (
                [make_batch(lengths[i : i + 1], device, model.config.vocab_size) for i in range(samples)]
                if batch_size == 1
                else [make_batch(lengths, device, model.config.vocab_size)]
            )
            unpatched = measure(functools.partial(forward_all, model, batches), device, repeats)
            fbk.patch(model)
            spread_students(model)
            profile = exit_profile(model, batches)
            # A speed at which about half of the rows leave after layer 1 and the rest spread later.
            speed = float(profile.uncertainty()[:, 0].median()) + 1e-6
            for label, s in (("speed 0", 0.0), ("half exit at layer 1", speed)):
                timing = measure(functools.partial(forward_all, model, batches, s), device, repeats)
                exits = torch.cat([model(**x, speed=s).exit_layer.cpu() for x in batches]).float()
                ideal = num_layers / float(exits.mean())
                measured = unpatched["median_ms"] / timing["median_ms"]
                rows.append(
                    {
                        "model": shape[0],
                        "batch": batch_size,
                        "setting": label,
                        "speed": s,
                        "mean_exit_layer": float(exits.mean()),
                        "unpatched_ms": unpatched["median_ms"],
                        "patched_ms": timing["median_ms"],
                        "speedup": measured,
                        "ideal_layer_speedup": ideal,
                        "efficiency": measured / ideal,
                    }
                )
            fbk.unpatch(model)
    return rows


@torch.no_grad()
def time_engine(device: torch.device, quick: bool) -> dict:
    """Saturation throughput (every request queued at once) of static batches of 64, unpatched and
    patched, and of the depth-pooled serving engine, at a speed where about half the rows leave
    after layer 1; plus the engine's batch fill."""
    from fastbert_kernels.serving import Engine

    shape = QUICK_SHAPES[0] if quick else SHAPES[0]
    count, max_batch = (32, 8) if quick else (1024, 64)
    model = random_model(shape, device)
    lengths = review_like_lengths(count, 128)
    requests = [torch.randint(5, model.config.vocab_size, (int(n),)).tolist() for n in lengths]
    batches = [
        make_batch(lengths[i : i + max_batch], device, model.config.vocab_size) for i in range(0, count, max_batch)
    ]
    begin = time.perf_counter()
    forward_all(model, batches)
    _sync(device)
    unpatched_s = time.perf_counter() - begin
    fbk.patch(model)
    spread_students(model)
    speed = float(exit_profile(model, batches[:1]).uncertainty()[:, 0].median()) + 1e-6
    forward_all(model, batches[:1], speed)  # warm-up
    begin = time.perf_counter()
    forward_all(model, batches, speed)
    _sync(device)
    patched_s = time.perf_counter() - begin
    with Engine(model, max_batch=max_batch) as engine:
        engine.classify(requests[:max_batch], speed=speed)  # warm-up
        begin = time.perf_counter()
        engine.classify(requests, speed=speed)
        engine_s = time.perf_counter() - begin
        fill = engine.stats.mean_fill(max_batch)
    return {
        "model": shape[0],
        "requests": count,
        "max_batch": max_batch,
        "speed": speed,
        "unpatched_static_per_s": count / unpatched_s,
        "patched_static_per_s": count / patched_s,
        "engine_per_s": count / engine_s,
        "engine_batch_fill": fill,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kernel_count(fn) -> int | None:
    """CUDA kernels launched by ``fn``, from the profiler (None where it cannot tell)."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@torch.no_grad()
def per_layer_counts(device: torch.device, quick: bool) -> dict:
    """Host syncs and launches per layer: unpatched, and patched with every branch running but
    nobody leaving (so every layer pays the full adaptive bookkeeping)."""
    shape = QUICK_SHAPES[0] if quick else SHAPES[0]
    num_layers = shape[1]
    model = random_model(shape, device)
    batch = make_batch(review_like_lengths(64, 128), device, model.config.vocab_size)
    with counting() as plain:
        model(**batch)
    fbk.patch(model)
    fbk.fastbert_config(model).trim_sequence = True
    speed = 1e-9  # every branch runs, nobody's uncertainty is below it
    model(**batch, speed=speed)  # warm-up: folding, Triton compilation
    with counting() as adaptive:
        model(**batch, speed=speed)
    result = {
        "model": shape[0],
        "unpatched_ops_per_layer": plain.launches / num_layers,
        "adaptive_ops_per_layer": adaptive.launches / num_layers,
        "adaptive_host_syncs": adaptive.syncs,
        "adaptive_host_syncs_per_branch_layer": (adaptive.syncs - 1) / (num_layers - 1),
        "extra_ops_per_branch_layer": (adaptive.launches - plain.launches) / (num_layers - 1),
        "sync_sources": dict(adaptive.sync_sources),
        "backend_cpu_or_cuda": ops.select_backend(device).name,
    }
    if device.type == "cuda":
        result["unpatched_cuda_kernels_per_layer"] = _kernel_count(lambda: fbk.unpatch(model)(**batch)) / num_layers
        fbk.patch(model)
        result["adaptive_cuda_kernels_per_layer"] = _kernel_count(lambda: model(**batch, speed=speed)) / num_layers
        # Syncs torch itself sees (C++ included): set_sync_debug_mode warns on each.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(**batch, speed=speed)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result["cuda_sync_warnings"] = len(caught)
    return result


def environment(device: torch.device) -> dict:
    import transformers

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "backends": fbk.ops.report(),
    }
    with contextlib.suppress(ImportError):
        import triton

        meta["triton"] = triton.__version__
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return meta


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['environment']['date']}", "", "```", json.dumps(report["environment"], indent=1)]
    lines += ["```", "", f"Tests: {report.get('tests', {}).get('summary', 'skipped')}", ""]
    lines += ["| op | backend | dtype | N | S | H | C | median ms |", "|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['n']} | {r['s']} | {r['h']} | {r['c']} | "
        f"{r['median_ms']:.3f} |"
        for r in report["ops"]
    ]
    lines += [
        "",
        "| model | batch | setting | mean exit layer | unpatched ms | patched ms | speed-up | ideal | efficiency |",
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['batch']} | {r['setting']} | {r['mean_exit_layer']:.2f} | {r['unpatched_ms']:.2f} | "
        f"{r['patched_ms']:.2f} | {r['speedup']:.2f}x | {r['ideal_layer_speedup']:.2f}x | {r['efficiency']:.2f} |"
        for r in report["end_to_end"]
    ]
    lines += ["", "Per layer:", "```", json.dumps(report["per_layer"], indent=1), "```", ""]
    lines += ["Serving engine at saturation:", "```", json.dumps(report.get("serving"), indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of this script)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    report = {"environment": environment(device)}
    if not args.skip_tests:
        report["tests"] = run_tests(args.test_timeout)
        print("tests:", report["tests"]["summary"], flush=True)
    report["ops"] = time_ops(device, args.quick, args.repeats)
    print(f"ops: {len(report['ops'])} timings", flush=True)
    report["end_to_end"] = time_end_to_end(device, args.quick, args.repeats)
    print(f"end to end: {len(report['end_to_end'])} timings", flush=True)
    report["per_layer"] = per_layer_counts(device, args.quick)
    report["serving"] = time_engine(device, args.quick)
    print("serving:", report["serving"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check" if device.type == "cuda" else f"gpu_check_{device.type}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
