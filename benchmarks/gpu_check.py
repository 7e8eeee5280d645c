"""The GPU check: one command that brings back everything a short GPU window can tell, even when a
stage fails.

    python3 benchmarks/gpu_check.py --out DIR            # on the GPU machine (or `make gpu-check`)
    python3 benchmarks/gpu_check.py --device cpu --quick --stages environment,kernels,end_to_end

Stages, in order, each in its own process with its own time cap inside one overall deadline (9
minutes by default), so that a crash, a hang or a broken CUDA context in one stage costs only that
stage; the report is rewritten after every stage, so a run cut short still returns what it got:

1. ``environment``: versions, the GPU, and which tools exist (nvcc, ninja, compute-sanitizer, ...);
2. ``build``: the extension for this GPU's own architecture only, the whole log, and the embedded
   code (``cuobjdump``). Without make or ninja too (setuptools' serial build);
3. ``sanitizer``: ``compute-sanitizer`` memcheck over the CUDA extension and the Triton ops, and
   racecheck/synccheck over the CUDA kernels, on awkward shapes (N = 0, 1, 7, 33; S = 1 to 300;
   H, R, C off every tile size), with the caching allocator off so that out-of-bounds accesses
   inside its blocks are seen. Skipped, with the reason, where the tool or the device refuses;
4. ``tests``: the CUDA-parametrised cases of the device suites (CI runs the CPU ones), the whole
   verbose log streamed to ``tests.log``, so a timeout still says which cases passed;
5. ``kernels``: each op per backend, wall time per call (CUDA events around a loop of calls, not
   one enqueue) beside kernel device time from the profiler;
6. ``end_to_end``: the MiniLM and BERT-base shapes (random weights: the packaged ones do not
   travel) at batch 1 and 64 against three dense baselines in the same process: the unpatched
   model padded, unpatched in length buckets (no padding beyond each bucket's longest), and
   unpatched in bf16/fp16. A speed-up counts against the best of them. Then syncs and kernels per
   layer after a warm-up, and the serving engine's saturation throughput and fill.

Everything lands in ``--out`` as at most six files: ``gpu_check.json``, ``gpu_check.md``,
``build.log``, ``sanitizer.log``, ``tests.log``, ``stages.log``. The machine's own Python is used
as it is (no network there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, layers, hidden, heads, intermediate): the packaged MiniLM's shape and BERT-base's.
SHAPES = [("minilm-l6", 6, 384, 12, 1536), ("bert-base", 12, 768, 12, 3072)]
QUICK_SHAPES = [("tiny", 4, 64, 4, 128)]
# The suites that parametrise every backend over the devices present; `-k cuda` keeps their CUDA
# cases (the CPU ones, and everything device-independent, are CI's).
DEVICE_SUITES = [
    "tests/test_ops.py",
    "tests/test_model.py",
    "tests/test_hf_integration.py",
    "tests/test_architectures.py",
]
DEFAULT_DEADLINE_S = 540.0
REPORT_FILES = ("gpu_check.json", "gpu_check.md", "build.log", "sanitizer.log", "tests.log", "stages.log")


# ---- The stage runner ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the check: ``run(context) -> dict`` in its own process (or the commands it
    starts), given at most ``cap_s`` seconds, and never so many that the stages after it lose
    their ``floor_s``."""

    name: str
    cap_s: float
    floor_s: float
    run: Callable[[StageContext], dict]


@dataclasses.dataclass
class StageContext:
    """What a stage knows: the options, its own deadline, where its logs and partial results go."""

    out: Path
    device: str
    quick: bool
    repeats: int
    deadline: float  # time.monotonic() by which the stage must be done
    result_path: Path | None = None  # in a stage process: partial results are saved here as they come

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, result: dict) -> None:
        if self.result_path is not None:
            self.result_path.write_text(json.dumps(result, indent=1, default=str))


def _stage_process(stage: Stage, context: StageContext, timeout: float, log) -> dict:
    """Runs ``stage`` in a child process of this script; what it saved survives its death."""
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--run-stage", stage.name, "--out", str(context.out)]
        # The child aims to finish a little before it is killed (its imports take seconds).
        budget = max(1.0, timeout - 5)
        command += ["--device", context.device, "--repeats", str(context.repeats), "--stage-budget", str(budget)]
        command += ["--result", str(result_path), *(["--quick"] if context.quick else [])]
        status = _run_logged(command, log, timeout)
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    return {**result, **status}


def _run_logged(command: Sequence[str], log, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Runs ``command`` with its output streamed into ``log`` (an open file); kills its whole
    process group at ``timeout``. Returns {returncode, timed_out, seconds}."""
    log.write(f"\n$ {' '.join(map(str, command))}\n")
    log.flush()
    begin = time.monotonic()
    process = subprocess.Popen(
        list(map(str, command)), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env or _child_env(),
        start_new_session=True,
    )  # fmt: skip
    try:
        returncode = process.wait(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        returncode, timed_out = process.wait(), True
        log.write(f"\n[gpu_check] killed after {timeout:.0f} s\n")
    log.flush()
    return {"returncode": returncode, "timed_out": timed_out, "seconds": round(time.monotonic() - begin, 1)}


def _child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    # One Triton cache for every stage: the tests' compilations serve the timings after them.
    env.setdefault("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fastbert-gpu-check-triton"))
    return env


def run_stages(stages: Sequence[Stage], context: StageContext, in_process: bool = False) -> dict:
    """Runs every stage in order within ``context.deadline``; no stage's failure stops the next.
    Each stage's entry in the report says ``status`` (passed / failed / timed out / skipped),
    its seconds and its results; the report is written to ``context.out`` after every stage."""
    report: dict = {"stages": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    context.out.mkdir(parents=True, exist_ok=True)
    with open(context.out / "stages.log", "a") as log:
        for i, stage in enumerate(stages):
            reserve = sum(later.floor_s for later in stages[i + 1 :])
            budget = min(stage.cap_s, context.deadline - time.monotonic() - reserve)
            if budget < 3:
                entry = {"status": "skipped", "reason": f"no time left ({budget:.0f} s after reserving later stages)"}
            else:
                stage_context = dataclasses.replace(context, deadline=time.monotonic() + budget)
                begin = time.monotonic()
                try:
                    if in_process:
                        entry = stage.run(stage_context)
                    else:
                        entry = _stage_process(stage, stage_context, budget, log)
                except Exception as err:  # a stage's failure is reported, never raised
                    entry = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                entry.setdefault("seconds", round(time.monotonic() - begin, 1))
                entry["budget_s"] = round(budget)
                entry["status"] = _status(entry)
            report["stages"][stage.name] = entry
            print(f"[gpu_check] {stage.name}: {entry['status']} ({entry.get('seconds', 0)} s)", flush=True)
            write_report(report, context.out)
    return report


def _status(entry: dict) -> str:
    if entry.get("skipped"):
        return "skipped"
    if entry.get("timed_out"):
        return "timed out"
    if entry.get("error") or entry.get("returncode", 0) not in (0, None) or entry.get("failed"):
        return "failed"
    return "passed"


# ---- Helpers the stages share ----------------------------------------------------------------


@contextlib.contextmanager
def forced_backend(name: str | None) -> Iterator[None]:
    """Within the block the ops use backend ``name`` (None: automatic); the previous choice is
    restored however the block ends, so one failed measurement does not skew the next."""
    from fastbert_kernels import ops

    saved = os.environ.get(ops.ENV_VAR)
    if name is None:
        os.environ.pop(ops.ENV_VAR, None)
    else:
        os.environ[ops.ENV_VAR] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ops.ENV_VAR, None)
        else:
            os.environ[ops.ENV_VAR] = saved


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device, repeats: int, inner: int = 1, warmup: int = 3) -> dict[str, float]:
    """Median, min and max milliseconds per call of ``fn``: each of ``repeats`` samples times
    ``inner`` back-to-back calls (CUDA events on a GPU, after a sync) and divides, so that a fast
    kernel is not timed by one Python enqueue."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / inner)
        else:
            begin = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append(1e3 * (time.perf_counter() - begin) / inner)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def kernel_time_per_call(fn: Callable[[], object], device, calls: int = 20) -> dict[str, float | int | None]:
    """From the profiler: CUDA kernel device time (µs) and kernels per call of ``fn`` (None on CPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {"device_us": None, "kernels": None}
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels)
    return {"device_us": total / calls, "kernels": len(kernels) / calls}


def _branch(h: int, r: int, c: int, device, heads: int = 2):
    """A branch scaled so that its answers are confident enough to split a batch."""
    import torch

    from fastbert_kernels.branch import BranchClassifier

    branch = BranchClassifier(h, c, r, num_heads=heads).to(device).eval()
    with torch.no_grad():
        for p in branch.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return branch


def _op_inputs(n: int, s: int, h: int, c: int, r: int, device, dtype, heads: int = 2):
    """hidden ``[n, s, h]``, a right-padded mask, and a random branch's folded weights."""
    import torch

    hidden = torch.randn(n, s, h, device=device).to(dtype)
    lengths = torch.randint(1, s + 1, (n,), device=device)
    mask = (torch.arange(s, device=device)[None, :] < lengths[:, None]).long()
    return hidden, mask, _branch(h, r, c, device, heads).folded_weights(dtype)


def random_model(shape, device, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

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


def review_like_lengths(count: int, limit: int):
    """Token counts drawn like Rotten Tomatoes snippets' (mean about 27, long right tail)."""
    import torch

    lengths = torch.distributions.LogNormal(math.log(24.0), 0.5).sample((count,)).round().long()
    return lengths.clamp(4, limit)


def make_batch(lengths, device, vocab: int) -> dict:
    import torch

    s = int(lengths.max())
    ids = torch.randint(1000, vocab, (len(lengths), s))
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}


def spread_students(model) -> None:
    """Random students with confident-ish outputs, so that exits spread over the layers."""
    import torch

    import fastbert_kernels as fbk

    with torch.no_grad():
        for branch in fbk.students(model):
            for p in branch.parameters():
                p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
    fbk.fastbert_config(model).students_trained = True  # they stand for trained students


def unpatched_forward(model, batches: list[dict]) -> None:
    """The Hugging Face class's own forward on the same weights (the unpatched model)."""
    forward = type(model).forward
    for batch in batches:
        forward(model, **batch)


def patched_forward(model, batches: list[dict], speed: float) -> None:
    for batch in batches:
        model(**batch, speed=speed)


# ---- Stage 1: environment ------------------------------------------------------------------------

TOOLS = ("nvcc", "ninja", "make", "compute-sanitizer", "ncu", "cuobjdump", "nvidia-smi", "ptxas")


def stage_environment(context: StageContext) -> dict:
    import torch
    import transformers

    import fastbert_kernels as fbk

    device = torch.device(context.device)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "tools": {tool: shutil.which(tool) for tool in TOOLS},
        "backends": fbk.ops.report(),
    }
    with contextlib.suppress(ImportError):
        import triton

        result["triton"] = triton.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["gpu"] = torch.cuda.get_device_name(device)
        result["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        result["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        result["multiprocessors"] = props.multi_processor_count
    return result


# ---- Stage 2: build ------------------------------------------------------------------------------


def device_architecture() -> str:
    """This GPU's compute capability as the build wants it ("90" on an H100/H200)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


IMPORT_PROBE = (
    "import json; from fastbert_kernels.ops import compiled, report; print(json.dumps({'load_error': "
    "compiled.LOAD_ERROR, 'build': compiled.BUILD_INFO, 'report': report()}, default=str))"
)


def stage_build(context: StageContext) -> dict:
    import torch

    if context.device != "cuda" or not torch.cuda.is_available():
        return {"skipped": True, "reason": "no CUDA device"}
    arch = os.environ.get("FASTBERT_CUDA_ARCH_LIST") or device_architecture()
    env = _child_env(FASTBERT_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 4))
    with open(context.out / "build.log", "a") as log:
        status = _run_logged(
            [sys.executable, "setup.py", "build_ext", "--inplace"], log, context.remaining() - 10, env=env
        )
        result = {"arch": arch, "ninja": shutil.which("ninja") is not None, **status}
        built = sorted((ROOT / "fastbert_kernels").glob("_C*.so"))
        result["library"] = [p.name for p in built]
        cuobjdump = shutil.which("cuobjdump")
        if built and cuobjdump:
            for flag in ("--list-elf", "--list-ptx"):
                listing = subprocess.run([cuobjdump, flag, str(built[0])], capture_output=True, text=True, timeout=60)
                log.write(f"\n$ cuobjdump {flag}\n{listing.stdout}{listing.stderr}")
                result[flag.lstrip("-").replace("-", "_")] = listing.stdout.split()[-20:]
    # Does the fresh build load, and does the CUDA backend take this GPU?
    probe = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, cwd=ROOT, env=_child_env(), timeout=120
    )
    lines = probe.stdout.strip().splitlines()
    result["import"] = json.loads(lines[-1]) if probe.returncode == 0 and lines else probe.stderr[-2000:]
    return result


# ---- Stage 3: compute-sanitizer ----------------------------------------------------------------

# (N, S, H, R, heads, C): no size a multiple of any tile; N = 0 and 1; long S.
SANITIZER_SHAPES = [(0, 5, 48, 48, 2, 3), (1, 1, 100, 48, 3, 2), (7, 129, 100, 48, 2, 77), (33, 300, 48, 96, 2, 150)]


def sanitizer_workload(backend: str, device_name: str) -> int:
    """Every op of ``backend`` once per awkward shape, margin criterion with a patience state (the
    top-two and streak code). Run under compute-sanitizer by the sanitizer stage."""
    import torch

    from fastbert_kernels import ops

    device = torch.device(device_name)
    with forced_backend(backend), torch.no_grad():
        for n, s, h, r, heads, c in SANITIZER_SHAPES:
            hidden, mask, folded = _op_inputs(n, s, h, c, r, device, torch.float32, heads)
            streak = torch.zeros(n, 2, dtype=torch.int64, device=device)
            out = ops.exit_head(hidden, mask, folded, heads, 0.5, "margin", 0.7, 2, streak)
            keep = torch.rand(n, device=device) < 0.5
            ops.compact(hidden, mask, torch.arange(n, device=device), keep, True)
            ops.compact(hidden.bfloat16(), mask, torch.arange(n, device=device), ~keep, False)
            del out
        _sync(device)
    return 0


def stage_sanitizer(context: StageContext) -> dict:
    import torch

    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return {"skipped": True, "reason": "compute-sanitizer is not on PATH"}
    if context.device != "cuda" or not torch.cuda.is_available():
        return {"skipped": True, "reason": "no CUDA device"}
    from fastbert_kernels.ops import compiled

    runs = [("memcheck", "triton")]
    if compiled.LOAD_ERROR is None and compiled.BUILD_INFO.get("cuda"):
        runs = [("memcheck", "extension"), ("racecheck", "extension"), ("synccheck", "extension"), *runs]
    # The caching allocator hands out slices of larger blocks, inside which an overrun is invisible.
    env = _child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result: dict = {"runs": {}}
    with open(context.out / "sanitizer.log", "a") as log:
        for i, (check, backend) in enumerate(runs):
            share = context.remaining() / (len(runs) - i)
            command = [tool, f"--tool={check}", "--error-exitcode=3", "--print-limit=20"]
            command += [sys.executable, str(Path(__file__).resolve()), "--sanitizer-workload", backend]
            start = log.tell()
            status = _run_logged(command, log, share, env=env)
            log.flush()
            text = (context.out / "sanitizer.log").read_text()[start:]
            summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
            status["errors"] = int(summary[-1]) if summary else None
            if status["errors"] is None and "not supported" in text.lower():
                status["refused"] = True  # seen on one runtime: "Device not supported", then error 999
            result["runs"][f"{check} {backend}"] = status
            context.save(result)
    verdicts = [run.get("errors") for run in result["runs"].values() if not run.get("refused")]
    result["failed"] = any(e for e in verdicts if e) or any(e is None for e in verdicts)
    result["verdict"] = (
        "refused by the device" if not verdicts else "clean" if not result["failed"] else "errors (see sanitizer.log)"
    )
    return result


# ---- Stage 4: the CUDA tests -------------------------------------------------------------------


def stage_tests(context: StageContext) -> dict:
    import torch

    if context.device != "cuda" or not torch.cuda.is_available():
        return {"skipped": True, "reason": "no CUDA device (CI runs the CPU cases)"}
    log_path = context.out / "tests.log"
    command = [sys.executable, "-m", "pytest", *DEVICE_SUITES, "-k", "cuda", "-v", "-p", "no:cacheprovider"]
    command += ["--durations=15", "-rfE"]
    with open(log_path, "a") as log:
        status = _run_logged(command, log, context.remaining() - 5)
    text = log_path.read_text()
    outcomes = re.findall(r"^(tests/\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.MULTILINE)
    counts: dict[str, int] = {}
    for _, outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    summary = [line for line in text.splitlines() if re.match(r"=+ .*(passed|failed|error).* =+$", line)]
    return {
        **status,
        "counts": counts,
        "failed_cases": [name for name, outcome in outcomes if outcome in ("FAILED", "ERROR")][:50],
        "summary": summary[-1] if summary else None,
    }


# ---- Stage 5: kernels, wall time beside device time ------------------------------------------


def stage_kernels(context: StageContext) -> dict:
    import torch

    from fastbert_kernels import ops

    device = torch.device(context.device)
    sizes = (
        [(8, 16, 64, 2)]
        if context.quick
        else [(64, 128, 768, 2), (64, 128, 768, 77), (1, 32, 384, 2), (64, 64, 384, 1000)]
    )
    dtypes = [torch.float32] if context.quick else [torch.float32, torch.bfloat16]
    inner = 1 if device.type == "cpu" else 20
    rows: list[dict] = []
    result = {"rows": rows, "inner_calls_per_sample": inner}
    for dtype in dtypes:
        for n, s, h, c in sizes:
            hidden, mask, folded = _op_inputs(n, s, h, c, 128, device, dtype)
            rows_index = torch.arange(n, device=device)
            keep = torch.rand(n, device=device) < 0.5
            streak = torch.zeros(n, 2, dtype=torch.int64, device=device)
            calls = {
                "exit_head": functools.partial(ops.exit_head, hidden, mask, folded, 2, 0.5),
                "exit_head margin T=0.5 patience 2": functools.partial(
                    ops.exit_head, hidden, mask, folded, 2, 0.5, "margin", 0.5, 2, streak
                ),
                "compact": functools.partial(ops.compact, hidden, mask, rows_index, keep, True),
            }
            for name, backend in ops.BACKENDS.items():
                if context.remaining() < 5:
                    result["truncated"] = "stage deadline"
                    return result
                if not ops.backends._runs(backend, device.type):
                    continue
                shape = {"backend": name, "dtype": str(dtype).replace("torch.", ""), "n": n, "s": s, "h": h, "c": c}
                for op_name, call in calls.items():
                    row = {"op": op_name, **shape}
                    try:
                        with forced_backend(name), torch.no_grad():
                            row.update(measure(call, device, context.repeats, inner=inner))
                            row.update(kernel_time_per_call(call, device))
                    except Exception as err:  # one failing op is a row with its error, not a lost stage
                        row["error"] = f"{type(err).__name__}: {err}"[:500]
                    rows.append(row)
                    context.save(result)
    result["failed"] = any("error" in row for row in rows)
    return result


# ---- Stage 6: end to end, per-layer counts, the serving engine -----------------------------------


def _baselines(model, batch_size: int, batches: list[dict], lengths, device, context) -> dict[str, dict]:
    """The dense baselines' timings: padded, length-bucketed, and half precision."""
    import torch

    timings = {"padded fp32": measure(functools.partial(unpatched_forward, model, batches), device, context.repeats)}
    if batch_size > 1:
        # No padding beyond each bucket's longest: sorted by length, 4 buckets, each trimmed.
        order = torch.argsort(lengths)
        buckets = [make_batch(lengths[chunk], device, model.config.vocab_size) for chunk in order.chunk(4)]
        timings["length buckets fp32"] = measure(
            functools.partial(unpatched_forward, model, buckets), device, context.repeats
        )
    half_dtypes = [torch.bfloat16] if device.type == "cpu" else [torch.bfloat16, torch.float16]
    if not context.quick:
        for dtype in half_dtypes:
            half = copy.deepcopy(model).to(dtype)
            name = f"padded {str(dtype).replace('torch.', '')}"
            timings[name] = measure(functools.partial(unpatched_forward, half, batches), device, context.repeats)
            del half
    return timings


def end_to_end(context: StageContext, result: dict) -> None:
    import torch

    import fastbert_kernels as fbk
    from fastbert_kernels.calibration import exit_profile

    device = torch.device(context.device)
    rows = result.setdefault("end_to_end", [])
    for shape in QUICK_SHAPES if context.quick else SHAPES:
        for batch_size in (1, 8) if context.quick else (1, 64):
            if context.remaining() < 20:
                result["end_to_end_truncated"] = "stage deadline"
                return
            model = random_model(shape, device)
            samples = 16 if batch_size == 1 else batch_size
            lengths = review_like_lengths(samples, 128)
            batches = (
                [make_batch(lengths[i : i + 1], device, model.config.vocab_size) for i in range(samples)]
                if batch_size == 1
                else [make_batch(lengths, device, model.config.vocab_size)]
            )
            with torch.no_grad():
                baselines = _baselines(model, batch_size, batches, lengths, device, context)
                best_name = min(baselines, key=lambda k: baselines[k]["median_ms"])
                fbk.patch(model)
                spread_students(model)
                profile = exit_profile(model, batches)
                # A speed at which about half of the rows leave after layer 1 and the rest spread later.
                half_speed = float(profile.uncertainty()[:, 0].median()) + 1e-6
                variants = [("fp32", model)]
                if not context.quick:
                    variants.append(("bf16", copy.deepcopy(model).to(torch.bfloat16)))
                for dtype_name, variant in variants:
                    for label, speed in (("speed 0", 0.0), ("half exit at layer 1", half_speed)):
                        timing = measure(
                            functools.partial(patched_forward, variant, batches, speed), device, context.repeats
                        )
                        exits = torch.cat([variant(**x, speed=speed).exit_layer.cpu() for x in batches]).float()
                        ideal = shape[1] / float(exits.mean())
                        same = baselines.get(f"padded {dtype_name}", baselines["padded fp32"])["median_ms"]
                        rows.append(
                            {
                                "model": shape[0],
                                "batch": batch_size,
                                "dtype": dtype_name,
                                "setting": label,
                                "speed": speed,
                                "mean_exit_layer": float(exits.mean()),
                                "patched_ms": timing["median_ms"],
                                "baselines_ms": {k: v["median_ms"] for k, v in baselines.items()},
                                "best_baseline": best_name,
                                "speedup_vs_same_dtype_padded": same / timing["median_ms"],
                                "speedup_vs_best": baselines[best_name]["median_ms"] / timing["median_ms"],
                                "ideal_layer_speedup": ideal,
                                "efficiency_vs_same_dtype": same / timing["median_ms"] / ideal,
                            }
                        )
                        context.save(result)
            del model


def per_layer_counts(context: StageContext) -> dict:
    """Host syncs and launches per layer, unpatched and patched with every branch running but
    nobody leaving (so every layer pays the full adaptive bookkeeping), each after a warm-up
    (folding the branches' weights and compiling Triton kernels are not per-layer work)."""
    import warnings

    import torch

    import fastbert_kernels as fbk
    from fastbert_kernels import ops
    from fastbert_kernels.ops.sync_counter import counting

    device = torch.device(context.device)
    shape = QUICK_SHAPES[0] if context.quick else SHAPES[0]
    num_layers = shape[1]
    model = random_model(shape, device)
    batch = make_batch(review_like_lengths(64, 128), device, model.config.vocab_size)
    speed = 1e-9  # every branch runs, nobody's uncertainty is below it
    with torch.no_grad():
        unpatched_forward(model, [batch])
        with counting() as plain:
            unpatched_forward(model, [batch])
        fbk.patch(model)
        fbk.fastbert_config(model).trim_sequence = True
        model(**batch, speed=speed)  # warm-up
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
            "backend": ops.select_backend(device).name,
        }
        if device.type == "cuda":
            unpatched = kernel_time_per_call(lambda: unpatched_forward(model, [batch]), device, calls=3)
            patched = kernel_time_per_call(lambda: model(**batch, speed=speed), device, calls=3)
            result["unpatched_cuda_kernels_per_layer"] = unpatched["kernels"] / num_layers
            result["adaptive_cuda_kernels_per_layer"] = patched["kernels"] / num_layers
            # Syncs torch itself sees (C++ included); only its synchronisation warnings are counted.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model(**batch, speed=speed)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            result["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
    return result


def time_engine(context: StageContext) -> dict:
    """Saturation throughput (every request queued at once) of static batches, unpatched and
    patched, and of the depth-pooled serving engine, at a speed where about half the rows leave
    after layer 1; plus the engine's batch fill. Every path is warmed up and synced alike."""
    import torch

    import fastbert_kernels as fbk
    from fastbert_kernels.calibration import exit_profile
    from fastbert_kernels.serving import Engine

    device = torch.device(context.device)
    shape = QUICK_SHAPES[0] if context.quick else SHAPES[0]
    count, max_batch = (32, 8) if context.quick else (1024, 64)
    model = random_model(shape, device)
    lengths = review_like_lengths(count, 128)
    requests = [torch.randint(5, model.config.vocab_size, (int(n),)).tolist() for n in lengths]
    batches = [
        make_batch(lengths[i : i + max_batch], device, model.config.vocab_size) for i in range(0, count, max_batch)
    ]

    def throughput(fn: Callable[[], object]) -> float:
        fn()  # warm-up
        _sync(device)
        begin = time.perf_counter()
        fn()
        _sync(device)
        return count / (time.perf_counter() - begin)

    with torch.no_grad():
        unpatched = throughput(lambda: unpatched_forward(model, batches))
        fbk.patch(model)
        spread_students(model)
        speed = float(exit_profile(model, batches[:1]).uncertainty()[:, 0].median()) + 1e-6
        patched = throughput(lambda: patched_forward(model, batches, speed))
    with Engine(model, max_batch=max_batch) as engine:
        engine_rate = throughput(lambda: engine.classify(requests, speed=speed))
        fill = engine.stats.mean_fill(max_batch)
    return {
        "model": shape[0],
        "requests": count,
        "max_batch": max_batch,
        "speed": speed,
        "unpatched_static_per_s": unpatched,
        "patched_static_per_s": patched,
        "engine_per_s": engine_rate,
        "engine_batch_fill": fill,
    }


def stage_end_to_end(context: StageContext) -> dict:
    torch_seed()
    result: dict = {}
    for name, part in (("end_to_end", end_to_end), ("per_layer", per_layer_counts), ("serving", time_engine)):
        try:
            if name == "end_to_end":
                part(context, result)
            else:
                result[name] = part(context)
        except Exception as err:  # each part is reported on its own
            result[f"{name}_error"] = f"{type(err).__name__}: {err}"[:2000]
            result["failed"] = True
        context.save(result)
    return result


def torch_seed() -> None:
    import torch

    torch.manual_seed(0)


# Caps and floors in seconds, for the 540-second default deadline on one H200: the build (one
# architecture, 16 cores) and the sanitizer get what they need first, the tests what is left but
# the floors, which keep the timings and the end-to-end stage alive whatever happens before them.
STAGES = [
    Stage("environment", cap_s=60, floor_s=10, run=stage_environment),
    Stage("build", cap_s=240, floor_s=0, run=stage_build),
    Stage("sanitizer", cap_s=90, floor_s=0, run=stage_sanitizer),
    Stage("tests", cap_s=200, floor_s=60, run=stage_tests),
    Stage("kernels", cap_s=60, floor_s=30, run=stage_kernels),
    Stage("end_to_end", cap_s=180, floor_s=120, run=stage_end_to_end),
]


# ---- The report ----------------------------------------------------------------------------------


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    stages = report["stages"]
    env = stages.get("environment", {})
    lines = [f"# GPU check, {report['started']}: {env.get('gpu', env.get('device', '?'))}", ""]
    lines += ["| stage | status | seconds | note |", "|---|---|---|---|"]
    for name, entry in stages.items():
        note = entry.get("reason") or entry.get("error") or entry.get("verdict") or entry.get("summary") or ""
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '-')} | {str(note)[:160]} |")
    if env:
        lines += ["", "```", json.dumps({k: v for k, v in env.items() if k != "status"}, indent=1, default=str), "```"]
    kernels = stages.get("kernels", {}).get("rows", [])
    if kernels:
        lines += ["", "| op | backend | dtype | N | S | H | C | wall ms/call | device µs/call | kernels/call |"]
        lines += ["|---|---|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['n']} | {r['s']} | {r['h']} | {r['c']} | "
            f"{_fmt(r.get('median_ms'))} | {_fmt(r.get('device_us'), 1)} | {_fmt(r.get('kernels'), 1)} |"
            + (f" {r['error'][:80]}" if "error" in r else "")
            for r in kernels
        ]
    e2e = stages.get("end_to_end", {})
    if e2e.get("end_to_end"):
        lines += [
            "",
            "| model | batch | dtype | setting | exit layer | patched ms | best baseline (ms) "
            "| vs same dtype | vs best | ideal |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|"]
        for r in e2e["end_to_end"]:
            best = r["best_baseline"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['setting']} | {r['mean_exit_layer']:.2f} | "
                f"{r['patched_ms']:.2f} | {best} ({r['baselines_ms'][best]:.2f}) | "
                f"{r['speedup_vs_same_dtype_padded']:.2f}x | {r['speedup_vs_best']:.2f}x | "
                f"{r['ideal_layer_speedup']:.2f}x |"
            )
    for part in ("per_layer", "serving"):
        if part in e2e:
            lines += ["", f"{part}:", "```", json.dumps(e2e[part], indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


# ---- Command line --------------------------------------------------------------------------------


def _run_one_stage(args) -> int:
    """In a stage's own process: run it, saving what it has as it goes."""
    stage = next(s for s in STAGES if s.name == args.run_stage)
    context = StageContext(
        out=args.out,
        device=args.device,
        quick=args.quick,
        repeats=args.repeats,
        deadline=time.monotonic() + args.stage_budget,
        result_path=args.result,
    )
    result = stage.run(context)
    context.save(result)
    return 1 if result.get("failed") else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of this script)")
    parser.add_argument("--stages", default=",".join(s.name for s in STAGES), help="comma-separated subset, in order")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="seconds for the whole check")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--run-stage", help=argparse.SUPPRESS)
    parser.add_argument("--stage-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sanitizer-workload", metavar="BACKEND", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.sanitizer_workload:
        return sanitizer_workload(args.sanitizer_workload, args.device)
    if args.run_stage:
        return _run_one_stage(args)
    wanted = args.stages.split(",")
    unknown = set(wanted) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; known: {', '.join(s.name for s in STAGES)}")
    context = StageContext(
        out=args.out, device=args.device, quick=args.quick, repeats=args.repeats,
        deadline=time.monotonic() + args.deadline,
    )  # fmt: skip
    report = run_stages([s for s in STAGES if s.name in wanted], context)
    print((args.out / "gpu_check.md").read_text())
    return 0 if all(entry["status"] in ("passed", "skipped") for entry in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
