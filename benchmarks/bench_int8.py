"""Early exit on an int8 encoder against the static runtimes a CPU user would pick, in one run.

    python benchmarks/bench_int8.py [--data banking77] [--checkpoint DIR] [--threads 1 2] [--onnx]

On the demo's distilled MiniLM on a data set (``make demo``; ``... demo --data banking77``): the rules are certified
label-free on the validation texts (disagreement with the *float* model at most each epsilon,
delta 0.05), then every method runs on the same test texts, interleaved batch by batch in a rotating
order (each repeat gives one ratio against unpatched fp32; the report gives the median):

* ``unpatched fp32``: the Hugging Face model;
* ``unpatched int8``: ``torch.ao.quantization.quantize_dynamic`` of it (nn.Linear to int8), the
  one-line alternative; and with per-channel weights, as ``fbk.quantize`` makes them;
* ``patched fp32``: this package under its certified rule;
* ``patched int8``: ``fbk.quantize(model, "int8")`` under the rule certified on it, against the
  float model (the certificate includes quantisation's own cost);
* ``patched int8, speed 0``: the int8 patched model with no exit (its cost against unpatched int8).
* with ``--onnx`` (the ``onnx`` extra: ``pip install -r requirements/onnx.txt``): ONNX Runtime
  fp32 on the unpatched model exported with ``torch.onnx.export(dynamo=True)``, and ONNX
  Runtime's own dynamic int8 quantisation of that graph (``onnxruntime.quantization``), with as
  many intra-op threads as torch gets and thread spinning off (so that it does not slow the
  methods interleaved with it); and the adaptive model itself on ONNX Runtime
  (:func:`fastbert_kernels.export_onnx`, a graph per layer and per student, exits on the host), in
  fp32 and with int8 layer graphs, each under the rule certified on its own profile against the
  float torch model's answers.
Each row also gives test accuracy and disagreement with unpatched fp32. Results:
benchmarks/results/int8_<data>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from demo_checkpoint import require_checkpoint
from interleaved import interleaved_ratios, under

import fastbert_kernels as fbk
from fastbert_kernels.apps.data import load_dataset
from fastbert_kernels.batching import make_batches
from fastbert_kernels.profile import exit_profile


def onnx_sessions(unpatched, tokenizer, folder: Path, threads: list[int]) -> dict[str, dict[int, Callable]]:
    """``{"onnxruntime fp32" | "onnxruntime int8": {threads: run(batch) -> logits}}``."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder.mkdir(parents=True, exist_ok=True)
    example = dict(tokenizer(["an example", "a longer example text"], padding=True, return_tensors="pt"))
    dims = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for name in example}
    fp32_path, int8_path = folder / "model.onnx", folder / "model.int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            unpatched, (), str(fp32_path), kwargs=example, input_names=list(example), output_names=["logits"],
            dynamic_shapes=dims, dynamo=True, verbose=False,
        )  # fmt: skip
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    runners: dict[str, dict[int, Callable]] = {"onnxruntime fp32": {}, "onnxruntime int8": {}}
    for name, path in (("onnxruntime fp32", fp32_path), ("onnxruntime int8", int8_path)):
        for count in threads:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = count, 1
            # ORT's workers spin after each run by default, which would steal the cores from the
            # torch methods timed right after it in the interleaved loop (seen: batch-1 ratios of 5-13x).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            wanted = [i.name for i in session.get_inputs()]

            def run(batch, session=session, wanted=wanted):
                feeds = {k: batch[k].numpy() for k in wanted}
                return torch.from_numpy(session.run(None, feeds)[0])

            runners[name][count] = run
    return runners


def onnx_adaptive(model, folder: Path, threads: list[int]) -> dict[str, dict[int, fbk.OnnxFastBert]]:
    """``{"onnx adaptive fp32" | "onnx adaptive int8": {threads: runner}}``: the patched model
    exported once per precision (kept in ``folder`` for the next run)."""
    fp32, int8 = folder / "adaptive", folder / "adaptive_int8"
    if not (fp32 / "fastbert_onnx.json").is_file():
        fbk.export_onnx(model, fp32)
    if not (int8 / "fastbert_onnx.json").is_file():
        fbk.quantize_onnx(fp32, int8)
    return {
        "onnx adaptive fp32": {t: fbk.OnnxFastBert(fp32, threads=t) for t in threads},
        "onnx adaptive int8": {t: fbk.OnnxFastBert(int8, threads=t) for t in threads},
    }


def onnx_runner(runner: fbk.OnnxFastBert) -> Callable:
    return lambda batch: runner(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="rotten_tomatoes", help="rotten_tomatoes or banking77")
    parser.add_argument("--checkpoint", default=None, help="default: the demo's distilled checkpoint for --data")
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--batch1-texts", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.01, 0.06])
    parser.add_argument("--onnx", action="store_true", help="add ONNX Runtime fp32 and int8 (the onnx extra)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    model, tokenizer, checkpoint = require_checkpoint(args.checkpoint, args.data)
    model.eval()
    data = load_dataset(args.data)
    cpu = torch.device("cpu")
    unpatched = fbk.unpatch(copy.deepcopy(model)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic = torch.ao.quantization.quantize_dynamic
        unpatched_int8 = quantize_dynamic(unpatched, {torch.nn.Linear}, dtype=torch.qint8)
        per_channel = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        unpatched_int8_channel = quantize_dynamic(unpatched, per_channel, dtype=torch.qint8)
    int8 = fbk.quantize(model, "int8")
    validation = make_batches(tokenizer, data.validation.texts, 64, args.max_length, cpu)
    profiles = {"patched fp32": exit_profile(model, validation), "patched int8": exit_profile(int8, validation)}
    candidates = {"patched fp32": model, "patched int8": int8}
    methods: dict[str, Callable] = {
        "unpatched fp32": lambda b: unpatched(**b).logits,
        "unpatched int8": lambda b: unpatched_int8(**b).logits,
        "unpatched int8 per-channel": lambda b: unpatched_int8_channel(**b).logits,
    }
    result: dict = {"data": args.data, "checkpoint": str(checkpoint), "rules": {}, "certificates": {}}
    adaptive = onnx_adaptive(model, Path(".cache/bench_int8") / args.data, args.threads) if args.onnx else {}
    for name, runners in adaptive.items():
        candidates[name] = model  # its FLOPs; the profile is the graphs' own
        profiles[name] = runners[args.threads[0]].exit_profile(validation, reference=model)
    onnx_methods: dict[str, dict[int, Callable]] = {}
    for epsilon in args.epsilons:
        for name, candidate in candidates.items():
            label = f"{name}, disagreement <= {epsilon:g}"
            try:
                found = fbk.calibrate(candidate, profiles[name], max_disagreement=epsilon, apply=False)
            except ValueError as err:
                print(f"{label}: {err}", flush=True)
                result["rules"][label] = str(err)
                continue
            rule = found.rule
            result["rules"][label], result["certificates"][label] = rule.as_dict(), found.certificate.as_dict()
            print(f"{label}: {rule.describe()}\n  {found.certificate}", flush=True)
            if name in adaptive:
                by_threads = {t: runner.with_rule(rule) for t, runner in adaptive[name].items()}
                onnx_methods[label] = {t: onnx_runner(runner) for t, runner in by_threads.items()}
                continue
            run = under(candidate, rule)
            methods[label] = lambda b, run=run: run(b).logits
    methods["patched int8, speed 0"] = lambda b: int8(**b, speed=0.0).logits
    onnx = onnx_sessions(unpatched, tokenizer, Path(".cache/bench_int8") / args.data, args.threads) if args.onnx else {}
    onnx.update(onnx_methods)
    for name, by_threads in onnx.items():
        methods[name] = by_threads[args.threads[0]]
    test = data.test.head(args.texts)
    labels = torch.tensor(test.labels)
    batches = make_batches(tokenizer, test.texts, 64, args.max_length, cpu)
    with torch.no_grad():
        answers = {name: torch.cat([fn(b) for b in batches]).argmax(-1) for name, fn in methods.items()}
    reference = answers["unpatched fp32"]
    result["accuracy"] = {name: float((a == labels).float().mean()) for name, a in answers.items()}
    result["disagreement_with_unpatched_fp32"] = {
        name: float((a != reference).float().mean()) for name, a in answers.items()
    }
    print(json.dumps({k: result[k] for k in ("accuracy", "disagreement_with_unpatched_fp32")}, indent=1), flush=True)
    threads_before = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            with_threads = {**methods, **{name: by_threads[threads] for name, by_threads in onnx.items()}}
            for batch_size, count in ((64, args.texts), (1, args.batch1_texts)):
                timed = make_batches(tokenizer, test.texts[:count], batch_size, args.max_length, cpu)
                ratios = {
                    name: r["median"]
                    for name, r in interleaved_ratios(with_threads, timed, args.repeats, "unpatched fp32").items()
                }
                key = f"threads_{threads}_batch_{batch_size}"
                result[key] = ratios
                print(key, json.dumps(ratios), flush=True)
    finally:
        torch.set_num_threads(threads_before)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"int8_{args.data}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
