"""Calibration, FLOPs, data loaders and the command line."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, rig_student, spread_branches, tiny_model, word_tokenizer

import fastbert_kernels as fbk
from fastbert_kernels import flops
from fastbert_kernels.calibration import choose_speed, exit_profile, flops_speedup


def test_flops_match_the_paper():
    # The paper's counts: one BERT-base layer 1809.9M, one branch 46.1M, at sequence 128.
    assert flops.branch_flops(768, 128, 2) == pytest.approx(46.1e6, rel=0.01)
    assert flops.layer_flops(768, 3072, 128) == pytest.approx(1809.9e6, rel=0.04)
    full = flops.model_flops(12, 768, 3072, 128, 2)
    assert flops.adaptive_flops(12, 12, 768, 3072, 128, 2, with_branches=False) == pytest.approx(full)
    assert flops.adaptive_flops(1, 12, 768, 3072, 128, 2) < full / 11
    # The fused exit head does less than the paper's branch (no K, V; one query) but keeps the projection.
    fused = flops.fused_branch_flops(768, 128, 2)
    assert 2 * 128 * 768 * 128 < fused < flops.branch_flops(768, 128, 2)
    assert flops.adaptive_flops(3, 12, 768, 3072, 128, 2, fused=True) < flops.adaptive_flops(3, 12, 768, 3072, 128, 2)


def test_exit_profile_predicts_the_real_forward():
    model = fbk.patch(tiny_model("bert"))
    spread_branches(model)
    batches = [random_batch(16, 19) for _ in range(3)]
    profile = exit_profile(model, batches)
    with torch.no_grad():
        for speed in (0.0, 0.3, 0.6, 0.9):
            real = torch.cat([model(**b, speed=speed).exit_layer for b in batches])
            predicted = profile.exit_layers(fbk.ExitRule(speed=speed))
            close = (profile.uncertainty()[:, :-1] - speed).abs().min(1).values < 1e-4
            assert torch.equal(real[~close], predicted[~close]), speed
            logits = torch.cat([model(**b, speed=speed).logits for b in batches])
            assert torch.equal(logits.argmax(-1)[~close], profile.predictions(fbk.ExitRule(speed=speed))[~close])


def test_choose_speed_for_accuracy_and_for_speedup():
    # A branch narrower than the tiny layers, so that early exits save FLOPs at all.
    model = fbk.patch(tiny_model("bert", hidden=64), branch_size=16)
    spread_branches(model)
    batches = [random_batch(32, 15) for _ in range(2)]
    profile = exit_profile(model, batches)
    labels = profile.prediction[:, -1].clone()  # the teacher is right by construction
    speed, stats = choose_speed(profile, labels, model, max_accuracy_drop=0.0)
    assert stats["teacher_accuracy"] == 1.0 and stats["accuracy"] == 1.0
    assert (profile.predictions(fbk.ExitRule(speed=speed)) == labels).all()
    # Random students disagree with the teacher somewhere: a speed above the chosen one loses accuracy.
    assert speed < 1.0
    assert not (profile.predictions(fbk.ExitRule(speed=min(1.0, speed + 0.01))) == labels).all()
    fast, fast_stats = choose_speed(profile, labels, model, min_speedup=1.2)
    assert fast_stats["speedup"] >= 1.2
    # ... and it is the smallest such speed on the grid.
    slower_rule = fbk.ExitRule(speed=max(0.0, fast - 0.005))
    slower = flops_speedup(model, profile.exit_layers(slower_rule), profile.lengths, slower_rule) if fast > 0 else 0.0
    assert slower < 1.2
    with pytest.raises(ValueError, match="no speed reaches"):
        choose_speed(profile, labels, model, min_speedup=100.0)
    with pytest.raises(ValueError, match="exactly one"):
        choose_speed(profile, labels, model)


def test_csv_loader(tmp_path):
    from fastbert_kernels.apps.data import load_csv, load_dataset

    path = tmp_path / "reviews.csv"
    rows = [f"text {i},{'good' if i % 3 else 'bad'}" for i in range(50)] + ["text 1,good"]  # one duplicate
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    data = load_csv(path)
    assert data.label_names == ["bad", "good"]
    assert len(data.train) + len(data.validation) + len(data.test) == 50
    assert load_dataset(str(path)).test.texts == data.test.texts  # seeded, so the split is fixed
    (tmp_path / "bad.csv").write_text("sentence,label\na,b\n")
    with pytest.raises(ValueError, match="lacks columns"):
        load_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")


def test_packaged_data_and_model_load_offline():
    pytest.importorskip("pandas")
    from fastbert_kernels.apps import data

    try:
        model_dir = data.packaged_model_dir()
        rotten = data.load_rotten_tomatoes()
        banking = data.load_banking77()
    except FileNotFoundError as err:
        pytest.skip(f"asset packages not installed: {err}")
    assert (model_dir / "model.safetensors").is_file()
    assert rotten.label_names == ["fresh", "rotten"]
    assert 12_500 < len(rotten.train) + len(rotten.validation) + len(rotten.test) < 12_900
    assert banking.num_labels == 77 and len(banking.train) == 9003 and len(banking.test) == 3080


def test_env_command_reports_backends(capsys):
    from fastbert_kernels.apps.cli import main

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "extension" in out and "torch" in out


def test_cli_rejects_bad_speeds(capsys):
    from fastbert_kernels.apps.cli import main

    with pytest.raises(SystemExit) as exit_info:  # a usage error: argparse's exit code 2
        main(["demo", "--speeds", "0.5", "1.5"])
    assert exit_info.value.code == 2 and "speed must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_csv_cache_key_follows_content_not_file_name(tmp_path):
    from fastbert_kernels.apps.data import load_csv

    for folder, labels in (("a", ["pos", "neg"]), ("b", ["pos", "neg", "mixed"])):
        (tmp_path / folder).mkdir()
        rows = [f"review number {i},{labels[i % len(labels)]}" for i in range(40)]
        (tmp_path / folder / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    first, second = (load_csv(tmp_path / f / "reviews.csv") for f in ("a", "b"))
    assert first.name == second.name == "reviews"
    assert first.fingerprint() != second.fingerprint()
    assert first.fingerprint() == load_csv(tmp_path / "a" / "reviews.csv").fingerprint()


def test_csv_problems_are_one_line_errors(tmp_path, capsys):
    from fastbert_kernels.apps.cli import main

    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9 cr\xe8me,a\nok,b\n".encode("latin-1"))
    (tmp_path / "tiny.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    for name, message in (("empty", "is empty"), ("latin1", "not UTF-8"), ("tiny", "too few")):
        assert main(["demo", "--data", str(tmp_path / f"{name}.csv"), "--cache-dir", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err, err


RULES = [
    ("entropy", 1.0, 1, None),
    ("max_prob", 0.5, 1, None),
    ("margin", 1.0, 2, None),
    ("entropy", 0.5, 3, None),
    ("max_prob", 2.0, 2, None),
    ("entropy", 1.0, 1, (3, 4, 5)),
    ("margin", 1.0, 2, (1, 2, 4)),
    ("max_prob", 1.0, 1, ()),
]


@pytest.mark.parametrize("criterion,temperature,patience,students", RULES)
def test_exit_profile_predicts_the_real_forward_under_every_rule(
    backend, device, criterion, temperature, patience, students
):
    """The profile's simulation of a rule equals the adaptive forward running it (patience state
    carried through compaction, students outside the rule skipped), except for rows within float
    noise of the threshold."""
    rule = fbk.ExitRule(criterion, temperature, patience, students=students)
    model = fbk.patch(tiny_model("bert", layers=6, device=device), exit_rule=rule)
    spread_branches(model)
    batches = [random_batch(16, 19, device=device) for _ in range(2)]
    profile = exit_profile(model, batches, temperatures=(temperature,))
    u = profile.uncertainty(criterion, temperature)[:, :-1]
    with torch.no_grad():
        for speed in (0.2, 0.5, 0.8, 1.0):
            outs = [model(**b, speed=speed) for b in batches]
            real = torch.cat([o.exit_layer for o in outs]).cpu()
            predicted = profile.exit_layers(rule.replace(speed=speed))
            close = (u - speed).abs().min(1).values < 1e-4
            assert torch.equal(real[~close], predicted[~close]), speed
            answers = torch.cat([o.logits for o in outs]).argmax(-1).cpu()
            assert torch.equal(answers[~close], profile.predictions(rule.replace(speed=speed))[~close])
            if patience > 1 and speed == 1.0:  # every student confident: nobody leaves before `patience`
                assert (real >= rule.student_layers(6)[patience - 1]).all()
            if students is not None:  # nobody leaves where no student runs
                assert set(real.tolist()) <= set(students) | {6}


def test_patience_counts_confident_students_that_agree(backend, device):
    model = fbk.patch(tiny_model("bert", layers=5, device=device), exit_rule=fbk.ExitRule(patience=2))
    config = fbk.fastbert_config(model)
    for layer in (1, 2, 3, 4):
        rig_student(model, layer, confident=True)  # every student sure of class 0
    batch = random_batch(6, 9, device=device)
    with torch.no_grad():
        assert (model(**batch, speed=0.5).exit_layer == 2).all()
        config.exit_rule = config.exit_rule.replace(patience=3)
        assert (model(**batch, speed=0.5).exit_layer == 3).all()
        # Student 2 sure of another class: the streak restarts there (1, 1, 1, 2): students 3 and 4
        # agree, so the rows leave at layer 4; with patience 3 they reach the teacher.
        config.exit_rule = config.exit_rule.replace(patience=2)
        fbk.students(model)[1].classifier.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        assert (model(**batch, speed=0.5).exit_layer == 4).all()
        config.exit_rule = config.exit_rule.replace(patience=3)
        assert (model(**batch, speed=0.5).exit_layer == 5).all()
        # An unsure student 2 breaks the streak as well (1, 0, 1, 2).
        config.exit_rule = config.exit_rule.replace(patience=2)
        rig_student(model, 2, confident=False)
        assert (model(**batch, speed=0.5).exit_layer == 4).all()


def test_calibrate_picks_the_fastest_rule_within_budget_and_applies_it():
    model = fbk.patch(tiny_model("bert", hidden=64, layers=6), branch_size=16)
    spread_branches(model)
    batches = [random_batch(32, 15) for _ in range(2)]
    profile = exit_profile(model, batches)
    labels = profile.prediction[:, -1].clone()  # the teacher is right by construction
    labels[:3] = (labels[:3] + 1) % 3  # ... except on three rows, so the teacher scores < 100%
    before = fbk.fastbert_config(model).exit_rule
    found = fbk.calibrate(
        model, profile, labels=labels, max_accuracy_drop=0.05, certified=False, student_sets="all", apply=False
    )
    assert fbk.fastbert_config(model).exit_rule == before  # apply=False leaves the model alone
    budget = found.teacher_accuracy - 0.05
    every = [s for curve in found.curves.values() for s in curve]
    assert {f.family for f in found.curves} == {
        (c, t, k, None) for c in fbk.ops.EXIT_CRITERIA for t in (1.0, 0.5, 0.25) for k in (1, 2, 3)
    }
    chosen = found.chosen
    assert chosen.accuracy >= budget
    assert chosen.speedup == pytest.approx(max(s.speedup for s in every if s.accuracy >= budget))
    for criterion, best in found.best.items():  # each criterion's best is its own fastest
        assert best.speedup == pytest.approx(
            max(s.speedup for s in every if s.rule.criterion == criterion and s.accuracy >= budget)
        )
    # Each setting's figures are the profile's exact simulation.
    layers = profile.exit_layers(chosen.rule)
    assert chosen.speedup == pytest.approx(flops_speedup(model, layers, profile.lengths, chosen.rule))
    assert "| criterion |" in found.table() and "(chosen)" in found.table()
    # Applied: the model now answers with the chosen rule and speed by default.
    found.apply(model)
    config = fbk.fastbert_config(model)
    assert config.exit_rule == chosen.rule
    with torch.no_grad():
        real = torch.cat([model(**b).exit_layer for b in batches])
    u = profile.uncertainty(chosen.rule.criterion, chosen.rule.temperature)[:, :-1]
    close = (u - chosen.rule.speed).abs().min(1).values < 1e-4
    assert torch.equal(real[~close], layers[~close])
    # The other target: the most accurate rule that reaches a speed-up.
    fast = fbk.calibrate(model, profile, labels=labels, min_speedup=1.3, student_sets="all", apply=False)
    assert fast.chosen.speedup >= 1.3
    assert fast.chosen.accuracy == max(s.accuracy for s in every if s.speedup >= 1.3)
    with pytest.raises(ValueError, match="no exit rule reaches the target"):
        fbk.calibrate(model, profile, labels=labels, min_speedup=100.0)
    with pytest.raises(ValueError, match="exactly one"):
        fbk.calibrate(model, profile, labels=labels)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] = \[64\]"):
        fbk.calibrate(model, profile, labels=labels[:5], max_accuracy_drop=0.01)


def test_exit_rule_config_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="unknown exit criterion"):
        fbk.ExitRule(criterion="entropi")
    with pytest.raises(ValueError, match="temperature must be positive"):
        fbk.ExitRule(temperature=-1.0)
    with pytest.raises(ValueError, match="patience must be at least 1"):
        fbk.ExitRule(patience=0)
    with pytest.raises(ValueError, match="increasing layer numbers"):
        fbk.ExitRule(students=(3, 2))
    with pytest.raises(TypeError, match=r"exit_rule=fbk\.ExitRule"):  # the version-1 keyword options
        fbk.patch(tiny_model("bert"), exit_criterion="margin")
    rule = fbk.ExitRule("margin", 0.5, 2, speed=0.3, students=(2, 3))
    model = fbk.patch(tiny_model("bert"), exit_rule=rule)
    spread_branches(model)
    model.save_pretrained(tmp_path)
    loaded = fbk.from_pretrained(tmp_path)
    assert fbk.fastbert_config(loaded).exit_rule == rule
    batch = random_batch(8, 11)
    with torch.no_grad():
        a, b = model(**batch, speed=0.7), loaded(**batch, speed=0.7)
    assert torch.equal(a.exit_layer, b.exit_layer) or ((a.uncertainty - 0.7).abs() < 1e-5).any()
    # A rule set after patching is checked when the model runs.
    fbk.fastbert_config(model).exit_rule = fbk.ExitRule(students=(1, 4))
    with pytest.raises(ValueError, match=r"after layers 1\.\.3"), torch.no_grad():
        model(**batch, speed=0.5)


def test_benchmark_times_each_rule_without_autograd_and_restores_the_config():
    from fastbert_kernels.apps.benchmarking import benchmark, fastbert_predict
    from fastbert_kernels.batching import make_batches

    model = fbk.patch(tiny_model("bert")).eval()
    spread_branches(model)
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 90}" for j in range(3 + i % 9)) for i in range(24)]
    labels = [i % 3 for i in range(24)]
    rule = fbk.ExitRule("margin", 0.5, 2, speed=0.8, students=(2, 3))
    rows = benchmark(
        model,
        tokenizer,
        texts,
        labels,
        [0.0, 0.5],
        batch_size=8,
        max_length=16,
        repeats=1,
        progress=False,
        rules=[rule],
    )
    (calibrated,) = [r for r in rows if r.method == "calibrated"]
    assert calibrated.rule == rule.describe() and calibrated.setting == 0.8
    assert {r.rule for r in rows if r.method == "fastbert"} == {fbk.ExitRule(speed=s).describe() for s in (0.0, 0.5)}
    assert fbk.fastbert_config(model).exit_rule == fbk.ExitRule()  # restored after timing
    # Timed as inference: no autograd graph is kept (it once was, and grew without bound).
    logits, _ = fastbert_predict(model, make_batches(tokenizer, texts, 8, 16, "cpu"), rule)
    assert not logits.requires_grad
