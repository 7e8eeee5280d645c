"""Students that pay for themselves: what a student costs where nobody leaves at it, and whether
the calibrated rule's wall-clock follows its ideal speed-up.

    python benchmarks/bench_students.py [--checkpoint DIR] [--repeats 5]

On the demo's distilled MiniLM (``make demo``), at batch 64 and batch 1, against the unpatched
model in the same run (methods interleaved batch by batch in a rotating order, so that load drifts
hit all alike; each repeat gives one ratio per method, the report gives the median and range):

* ``all students, nobody exits``: every student runs at a speed below every uncertainty the test
  texts produce (the cost the issue measured: pure overhead);
* ``last student, nobody exits``: the cheapest set of students that still exits at all;
* ``speed 0``: no student (what calibration keeps when no rule pays for its students);
* ``certified``: the rule ``fbk.calibrate(..., max_disagreement=0.01)`` certifies on the
  validation texts (label-free, student sets chosen by calibration), with its ideal speed-up on
  the test texts and the efficiency (wall-clock / ideal).
Results: benchmarks/results/students.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from demo_checkpoint import require_checkpoint
from interleaved import interleaved_ratios, under

import fastbert_kernels as fbk
from fastbert_kernels.apps.data import load_rotten_tomatoes
from fastbert_kernels.batching import make_batches
from fastbert_kernels.profile import FlopsTable, exit_profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch1-texts", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    model, tokenizer, checkpoint = require_checkpoint(args.checkpoint)
    model.eval()
    data = load_rotten_tomatoes()
    device = torch.device("cpu")
    validation = make_batches(tokenizer, data.validation.texts, 64, args.max_length, device)
    certified = fbk.calibrate(model, exit_profile(model, validation), max_disagreement=0.01, apply=False)
    layers = model.config.num_hidden_layers
    result: dict = {
        "checkpoint": str(checkpoint),
        "threads": torch.get_num_threads(),
        "certified_rule": certified.rule.as_dict(),
        "certificate": certified.certificate.as_dict(),
    }
    for batch_size, count in ((64, args.texts), (1, args.batch1_texts)):
        texts = data.test.texts[:count]
        batches = make_batches(tokenizer, texts, batch_size, args.max_length, device)
        profile = exit_profile(model, batches)
        lowest = float(profile.uncertainty()[:, :-1].min())  # below every student's uncertainty
        quiet = fbk.ExitRule(speed=lowest / 2)
        rules = {
            "unpatched": None,
            "speed 0": fbk.ExitRule(speed=0.0),
            "all students, nobody exits": quiet,
            "last student, nobody exits": quiet.replace(students=(layers - 1,)),
            "certified": certified.rule,
        }
        methods = {name: under(model, rule) for name, rule in rules.items()}
        ratios = interleaved_ratios(methods, batches, args.repeats, "unpatched")
        test_profile = exit_profile(model, batches, temperatures=(certified.rule.temperature,))
        table = FlopsTable(model, test_profile.padded, fused=True)  # the work this implementation does
        ideal = table.speedup(test_profile.exit_layers(certified.rule), certified.rule)
        result[f"batch_{batch_size}"] = {
            "texts": len(texts),
            "wallclock_speedup": ratios,
            "certified_ideal_speedup": ideal,
            "certified_efficiency": ratios["certified"]["median"] / ideal,
        }
        print(json.dumps({f"batch {batch_size}": result[f"batch_{batch_size}"]}, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "students.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
