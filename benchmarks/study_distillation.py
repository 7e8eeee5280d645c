"""Which distillation recipe gives the best students, and what each exit criterion makes of them.

For each recipe (learning rate, epochs, weight of a hard-label term) the students are distilled
from the same cached teacher (the demo's cache: a recipe the demo later uses is not trained
twice), then one full pass with every classifier on validation and on test gives

* each student's accuracy on its own (validation);
* per exit criterion, the rule and speed calibrated on validation (the fastest within 1 point of
  the teacher, temperatures and patiences swept), and what that rule does on test: accuracy and
  ideal speed-up, simulated exactly from the test pass (no timing here; the demo times).

    python benchmarks/study_distillation.py --data banking77 --epochs 3 --lr 1e-4 \\
        --recipes 2e-4:1:0 1e-3:3:0 3e-3:3:0 3e-3:3:0.5

Writes ``benchmarks/results/distillation_study_<data>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastbert_kernels.apps.data import load_dataset
from fastbert_kernels.apps.demo import BATCH_SIZE, MAX_ACCURACY_DROP, prepare_model, student_accuracy
from fastbert_kernels.batching import make_batches
from fastbert_kernels.calibration import FlopsTable, calibrate, exit_profile

RESULTS = Path(__file__).parent / "results"


def _recipe(text: str) -> dict:
    """``lr:epochs:label_weight[:max_grad_norm]`` (a missing or 0 norm: no clipping)."""
    lr, epochs, label_weight, *clip = text.split(":")
    return {
        "distill_lr": float(lr),
        "distill_epochs": int(epochs),
        "distill_label_weight": float(label_weight),
        "distill_max_grad_norm": float(clip[0]) if clip else 0.0,
    }


def study(args: argparse.Namespace) -> list[dict]:
    dataset = load_dataset(args.data, seed=args.seed)
    results = []
    for text in args.recipes:
        recipe = _recipe(text)
        run_args = argparse.Namespace(**{**vars(args), **recipe})
        begin = time.perf_counter()
        model, tokenizer, timings = prepare_model(run_args, dataset)
        prepared = time.perf_counter() - begin
        model.eval()
        device = next(model.parameters()).device
        profiles, labels = {}, {}
        for name, split in (("validation", dataset.validation), ("test", dataset.test)):
            split = split.head(args.max_eval)
            batches = make_batches(tokenizer, split.texts, BATCH_SIZE, args.max_length, device)
            profiles[name], labels[name] = exit_profile(model, batches), torch.tensor(split.labels)
        calibration = calibrate(
            model,
            profiles["validation"],
            labels=labels["validation"],
            max_accuracy_drop=MAX_ACCURACY_DROP,
            certified=False,
            apply=False,
        )
        test, table = profiles["test"], FlopsTable(model, profiles["test"].lengths)
        teacher_test = float((test.prediction[:, -1] == labels["test"]).float().mean())
        per_criterion = {}
        for criterion, best in calibration.best.items():
            if best is None:
                per_criterion[criterion] = None
                continue
            layers = test.exit_layers(best.rule)
            predicted = test.answers(layers)
            per_criterion[criterion] = {
                "validation": best.as_dict(),
                "test_accuracy": float((predicted == labels["test"]).float().mean()),
                "test_ideal_speedup": table.speedup(layers, best.rule),
            }
        row = {
            "recipe": recipe,
            "distill_s": timings.get("distill_s"),
            "prepare_s": prepared,
            "classifier_accuracy_validation": student_accuracy(profiles["validation"], labels["validation"]),
            "teacher_accuracy_test": teacher_test,
            "criteria": per_criterion,
        }
        print(json.dumps(row, indent=1))
        results.append(row)
    return results


def markdown(results: list[dict], data: str) -> str:
    lines = [
        f"# Distillation recipes on {data}",
        "",
        "Calibrated on validation (fastest rule within 1 point of the teacher), measured on test from one "
        "full pass (ideal speed-up: FLOPs at the real lengths).",
        "",
        "| lr | epochs | label weight | clip | distil s | classifiers alone (validation) | criterion | T | patience | "
        "speed | test accuracy (teacher) | ideal speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        recipe = row["recipe"]
        accuracy = " / ".join(f"{100 * a:.0f}" for a in row["classifier_accuracy_validation"])
        seconds = f"{row['distill_s']:.0f}" if row["distill_s"] else "cached"
        for criterion, found in row["criteria"].items():
            head = (
                f"| {recipe['distill_lr']:g} | {recipe['distill_epochs']} | {recipe['distill_label_weight']:g} | "
                f"{recipe['distill_max_grad_norm'] or '-'} | {seconds} | {accuracy}% "
            )
            if found is None:
                lines.append(head + f"| {criterion} | - | - | - | no rule within 1 point | - |")
                continue
            v = found["validation"]
            lines.append(
                head + f"| {criterion} | {v['temperature']:g} | {v['patience']} | {v['speed']:.4f} | "
                f"{100 * found['test_accuracy']:.2f}% ({100 * row['teacher_accuracy_test']:.2f}%) | "
                f"{found['test_ideal_speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="banking77")
    parser.add_argument("--recipes", nargs="+", default=["2e-4:1:0", "1e-3:3:0", "3e-3:3:0", "3e-3:3:0.5"])
    parser.add_argument("--epochs", type=int, default=3, help="the teacher's fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=1e-4, help="the teacher's fine-tuning learning rate")
    parser.add_argument("--teacher", default="model")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None, help="validation and test texts used")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/fastbert_demo")
    args = parser.parse_args()
    results = study(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"distillation_study_{args.data}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"distillation_study_{args.data}.md").write_text(markdown(results, args.data))
    print(markdown(results, args.data))


if __name__ == "__main__":
    main()
