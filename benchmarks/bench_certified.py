"""Does the certificate hold, and what does it cost? 20 random calibration/test splits of the
held-out texts (validation + test, never trained or distilled on) of a distilled demo checkpoint.

    python benchmarks/bench_certified.py --data rotten_tomatoes     # after `make demo`
    python benchmarks/bench_certified.py --data banking77           # after `... demo --data banking77`

For each split: the certified rule (label-free disagreement, and labelled accuracy drop, each at
epsilon = 1 point, delta = 0.1), today's point-estimate pick with the same budget, and the oracle
(the fastest rule whose risk on the test half itself is within epsilon: the bound no calibration
can beat). Reports how often each exceeds epsilon on test, and the median ratio of the certified
rule's ideal speed-up (on the test half) to the oracle's. One profile of every classifier serves
all of it (each sample's exit depends on its own logits only). Results:
benchmarks/results/certified_<data>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fastbert_kernels as fbk
from fastbert_kernels.apps.data import load_dataset
from fastbert_kernels.batching import make_batches
from fastbert_kernels.calibration import ExitProfile, FlopsTable, exit_profile
from fastbert_kernels.certification import CERTIFY_SPEEDS, default_families

ROOT = Path(__file__).resolve().parents[1]

DEMO_CACHE = ROOT / ".cache" / "fastbert_demo"


def risk_of(profile: ExitProfile, labels, rule: fbk.ExitRule, risk: str) -> float:
    early = profile.predictions(rule)
    full = profile.full_answers
    if risk == "disagreement":
        return float((early != full).float().mean())
    return float((full == labels).float().mean() - (early == labels).float().mean())


def oracle(model, profile: ExitProfile, labels, risk: str, epsilon: float, families) -> float:
    """The largest ideal speed-up of any grid rule whose risk on ``profile`` is within epsilon."""
    table, best, speeds = FlopsTable(model, profile.lengths), 1.0, CERTIFY_SPEEDS
    full = profile.full_answers
    for family in families:
        layers = profile.exit_layers_at(family, speeds)  # [S, N]
        early = profile.prediction.gather(1, (layers - 1).T).T
        if risk == "disagreement":
            risks = (early != full).float().mean(1)
        else:
            risks = (full == labels).float().mean() - (early == labels).float().mean(1)
        speedups = table.speedups(layers, family, speeds)
        within = risks <= epsilon
        if within.any():
            best = max(best, float(speedups[within].max()))
    return best


def certified_on(model, calibration: ExitProfile, cal_labels, test: ExitProfile, test_labels, risk, args, **options):
    """The certified rule's ideal speed-up and risk on the test half (1.0 and 0: nothing certified,
    the model runs at speed 0), and the rule."""
    target = {"max_disagreement": args.epsilon} if risk == "disagreement" else {"max_accuracy_drop": args.epsilon}
    labels = None if risk == "disagreement" else cal_labels
    try:
        found = fbk.calibrate(model, calibration, labels=labels, delta=args.delta, apply=False, **target, **options)
    except ValueError:
        return 1.0, 0.0, None
    rule = found.rule
    speedup = FlopsTable(model, test.lengths).speedup(test.exit_layers(rule), rule)
    return speedup, risk_of(test, test_labels, rule, risk), rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="rotten_tomatoes")
    parser.add_argument("--checkpoint", default=None, help="default: the demo's cached distilled checkpoint")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.01)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="*", default=[250, 500], help="smaller calibration sets (the curve)")
    parser.add_argument("--student-sets", choices=["auto", "all"], default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    found = sorted(DEMO_CACHE.glob(f"{args.data}-fastbert-*")) if args.checkpoint is None else [Path(args.checkpoint)]
    if not found:
        raise SystemExit(f"no distilled checkpoint for {args.data}: run the demo first (make demo)")
    model, tokenizer = fbk.load_checkpoint(found[-1])
    dataset = load_dataset(args.data)
    held_out = dataset.validation.texts + dataset.test.texts
    labels_all = torch.tensor(dataset.validation.labels + dataset.test.labels)
    begin = time.perf_counter()
    profile = exit_profile(model, make_batches(tokenizer, held_out, 64, args.max_length, torch.device("cpu")))
    profile_s = time.perf_counter() - begin
    families = default_families(students=[None])
    options = {"student_sets": args.student_sets}
    n = len(held_out)
    rows = []
    for split in range(args.splits):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(split))
        calibration_rows, test_rows = order[: n // 2], order[n // 2 :]
        calibration, test = profile.subset(calibration_rows), profile.subset(test_rows)
        cal_labels, test_labels = labels_all[calibration_rows], labels_all[test_rows]
        row = {"split": split}
        for risk in ("disagreement", "accuracy_drop"):
            row[f"oracle_{risk}"] = oracle(model, test, test_labels, risk, args.epsilon, families)
            certified = certified_on(model, calibration, cal_labels, test, test_labels, risk, args, **options)
            row[f"certified_{risk}_speedup"], row[f"certified_{risk}_test_risk"], rule = certified
            row[f"certified_{risk}_rule"] = None if rule is None else rule.as_dict()
            for size in args.sizes:  # the same split, calibrated on its first `size` texts only
                if size < len(calibration_rows):
                    few = torch.arange(size)
                    speedup, test_risk, _ = certified_on(
                        model, calibration.subset(few), cal_labels[few], test, test_labels, risk, args, **options
                    )
                    row[f"certified_{risk}_speedup_at_{size}"] = speedup
                    row[f"certified_{risk}_test_risk_at_{size}"] = test_risk
        point = fbk.calibrate(
            model, calibration, labels=cal_labels, max_accuracy_drop=args.epsilon, certified=False,
            student_sets="all", apply=False,
        )  # fmt: skip
        rule = point.rule
        row["point_estimate_test_drop"] = risk_of(test, test_labels, rule, "accuracy_drop")
        row["point_estimate_test_disagreement"] = risk_of(test, test_labels, rule, "disagreement")
        row["point_estimate_speedup"] = FlopsTable(model, test.lengths).speedup(test.exit_layers(rule), rule)
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "data": args.data,
        "checkpoint": str(found[-1]),
        "held_out_texts": n,
        "epsilon": args.epsilon,
        "delta": args.delta,
        "splits": args.splits,
        "profile_seconds": profile_s,
        "calibration_texts": n // 2,
        "student_sets": args.student_sets,
    }
    for risk in ("disagreement", "accuracy_drop"):
        summary[f"certified_{risk}_exceeds"] = sum(r[f"certified_{risk}_test_risk"] > args.epsilon for r in rows)
        summary[f"certified_{risk}_median_vs_oracle"] = statistics.median(
            r[f"certified_{risk}_speedup"] / r[f"oracle_{risk}"] for r in rows
        )
        summary[f"certified_{risk}_median_speedup"] = statistics.median(r[f"certified_{risk}_speedup"] for r in rows)
        summary[f"oracle_{risk}_median_speedup"] = statistics.median(r[f"oracle_{risk}"] for r in rows)
        for size in args.sizes:
            key = f"certified_{risk}_speedup_at_{size}"
            if all(key in r for r in rows):
                summary[f"{key}_median"] = statistics.median(r[key] for r in rows)
                summary[f"certified_{risk}_exceeds_at_{size}"] = sum(
                    r[f"certified_{risk}_test_risk_at_{size}"] > args.epsilon for r in rows
                )
    summary["point_estimate_drop_exceeds"] = sum(r["point_estimate_test_drop"] > args.epsilon for r in rows)
    summary["point_estimate_median_speedup"] = statistics.median(r["point_estimate_speedup"] for r in rows)
    summary["point_estimate_median_test_drop"] = statistics.median(r["point_estimate_test_drop"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"certified_{args.data}.json").write_text(json.dumps({"summary": summary, "splits": rows}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
