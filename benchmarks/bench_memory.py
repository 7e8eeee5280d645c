"""Peak memory of one forward at batch 64: unpatched model vs the patched model at several speeds.

    python benchmarks/bench_memory.py [--seq 128] [--batch 64]   (the packaged all-MiniLM-L6-v2)

Each configuration runs in a fresh subprocess, so peaks do not mix. On CUDA: the peak of
torch.cuda.max_memory_allocated over one forward. On CPU: the peak of live heap bytes (glibc
mallinfo2: in-use arena plus mmapped chunks), sampled by a thread every few microseconds during the
forward (the ops release the GIL), minus the bytes live before it. The resident set is no measure
here: glibc raises its mmap threshold after large frees and keeps the heap, so RSS grows with
allocation patterns, not with live memory. Compaction must not keep full-size tensors alive, so
adaptive peaks should not exceed the baseline.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import ctypes, json, sys, threading, torch
import fastbert_kernels as fbk
from fastbert_kernels.apps.data import packaged_model_dir
from transformers import AutoModelForSequenceClassification
method, speed, seq, batch = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(str(packaged_model_dir()), num_labels=2).eval().to(device)
if method == "fastbert":
    fbk.patch(model)
    with torch.no_grad():  # students that exit at every layer, so that compaction happens
        for branch in fbk.students(model):
            for p in branch.parameters():
                p.normal_(0, 2.0 / p.shape[-1] ** 0.5)
ids = torch.randint(1000, 30000, (batch, seq), device=device)
lengths = torch.randint(seq // 4, seq + 1, (batch,), device=device)
mask = (torch.arange(seq, device=device)[None] < lengths[:, None]).long()
forward = (lambda: model(input_ids=ids, attention_mask=mask, speed=speed)) if method == "fastbert" else (
    lambda: type(model).forward(model, input_ids=ids, attention_mask=mask))
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def live_bytes():
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd
with torch.no_grad():
    forward()  # warm-up: one-time allocations are not what is measured
    if device == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        out = forward()
        torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
    else:
        base, highest, running = live_bytes(), [0], [True]
        def sample():
            while running[0]:
                highest[0] = max(highest[0], live_bytes())
        sampler = threading.Thread(target=sample); sampler.start()
        out = forward()
        running[0] = False; sampler.join()
        peak = max(highest[0], live_bytes()) - base
layers = out.exit_layer.float().mean().item() if method == "fastbert" else model.config.num_hidden_layers
print(json.dumps({"method": method, "speed": speed, "peak_bytes": peak, "mean_exit_layer": layers, "device": device}))
"""


def measure(method: str, speed: float, seq: int, batch: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(speed), str(seq), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rows = [measure("huggingface", 0.0, args.seq, args.batch)]
    rows += [measure("fastbert", s, args.seq, args.batch) for s in (0.0, 0.3, 0.6, 0.9)]
    base = rows[0]["peak_bytes"]
    print(
        f"peak memory above the loaded model, one forward, batch {args.batch}, sequence {args.seq}, "
        f"{rows[0]['device']} (peak live heap bytes sampled on CPU; peak allocated on CUDA)"
    )
    for r in rows:
        ratio = r["peak_bytes"] / base if base else float("nan")
        print(
            f"{r['method']:<12} speed {r['speed']:.1f}  mean exit layer {r['mean_exit_layer']:.2f}  "
            f"peak {r['peak_bytes'] / 2**20:8.1f} MiB  ({ratio:.2f}x the unpatched model)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
