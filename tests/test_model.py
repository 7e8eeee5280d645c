"""The patched model end to end, on tiny random configs (no downloads), with every backend forced."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, rig_student, spread_branches, tiny_model, word_tokenizer

import fastbert_kernels as fbk
from fastbert_kernels.architectures import architecture_for
from fastbert_kernels.calibration import exit_profile
from fastbert_kernels.ops.sync_counter import counting

KINDS = ["bert", "roberta"]


def _pad_id(model) -> int:
    return model.config.pad_token_id or 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_speed_zero_equals_unpatched(backend, device, kind, attn):
    model = tiny_model(kind, attn, device=device)
    batch = random_batch(9, 23, _pad_id(model), device=device)
    with torch.no_grad():
        expected = model(**batch).logits
        fbk.patch(model)
        spread_branches(model)
        out = model(**batch, speed=0.0)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert out.exit_layer.dtype == torch.int64
    assert torch.equal(out.exit_layer.cpu(), torch.full((9,), 4))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rigged_first_student_exits_everyone_at_layer_one(backend, device, attn):
    model = fbk.patch(tiny_model("bert", attn, device=device))
    rig_student(model, 1, confident=True)
    with torch.no_grad():
        out = model(**random_batch(11, 17, device=device), speed=1.0)
    assert torch.equal(out.exit_layer.cpu(), torch.ones(11, dtype=torch.int64))
    assert torch.equal(out.logits.argmax(-1).cpu(), torch.zeros(11, dtype=torch.int64))
    assert (out.uncertainty < 1e-3).all()


def test_speed_nobody_meets_exits_nobody(backend, device):
    model = fbk.patch(tiny_model("bert", device=device))
    for layer in range(1, 4):
        rig_student(model, layer, confident=False)  # uniform: u = 1
    batch = random_batch(8, 12, device=device)
    with torch.no_grad():
        expected = fbk.unpatch(model)(**batch).logits
        fbk.patch(model)
        for layer in range(1, 4):
            rig_student(model, layer, confident=False)
        out = model(**batch, speed=0.9)
    assert torch.equal(out.exit_layer.cpu(), torch.full((8,), 4))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_row_speed", [False, True])
def test_non_finite_row_goes_to_the_teacher(backend, device, per_row_speed):
    """A row whose hidden states turn NaN after layer 1 (an overflow, say) is never taken for
    certain: it runs to the teacher, which answers NaN as the unpatched model does, and the other
    rows answer exactly as they do without it."""
    model = fbk.patch(tiny_model("bert", device=device))
    spread_branches(model)
    batch = random_batch(7, 13, device=device)
    bad = int(torch.randint(0, 7, ()))
    speed = torch.full((7,), 0.9, device=device) if per_row_speed else 0.9
    layers = architecture_for(model).layers(model)

    def poison(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        if hidden.shape[0] == 7:  # layer 1 sees the whole batch
            hidden[bad] = float("nan")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        clean = model(**batch, speed=speed)
        handle = layers[0].register_forward_hook(poison)
        try:
            out = model(**batch, speed=speed)
        finally:
            handle.remove()
    assert int(out.exit_layer[bad]) == 4
    assert out.logits[bad].isnan().all() and out.uncertainty[bad].isnan()
    others = torch.arange(7, device=device) != bad
    assert clean.exit_layer[others].lt(4).any()  # the others do leave early: the speed is not vacuous
    assert torch.equal(out.exit_layer[others], clean.exit_layer[others])
    torch.testing.assert_close(out.logits[others], clean.logits[others], atol=1e-5, rtol=0)


def test_later_layer_rigged_exits_there(backend, device):
    model = fbk.patch(tiny_model("bert", device=device))
    rig_student(model, 1, confident=False)
    rig_student(model, 2, confident=True)
    with torch.no_grad():
        out = model(**random_batch(5, 9, device=device), speed=0.5)
    assert torch.equal(out.exit_layer.cpu(), torch.full((5,), 2))


def _splitting_speed(first_student_u: torch.Tensor) -> float:
    """A threshold that sends about half the batch out at layer 1 and the rest later, whatever
    this run's random weights: the midpoint of the widest gap between sorted uncertainties in
    the middle half of the batch, so that no sample sits near it."""
    u = first_student_u.sort().values
    if u.numel() == 1:
        return float(u[0]) / 2
    lo, hi = u.numel() // 4, max(u.numel() // 4 + 1, 3 * u.numel() // 4)
    gaps = u[lo + 1 : hi + 1] - u[lo:hi]
    i = lo + int(gaps.argmax())
    return float(u[i] + u[i + 1]) / 2


def _alone(model, batch, i: int, speed: float):
    length = int(batch["attention_mask"][i].sum())
    single = {k: v[i : i + 1, :length] for k, v in batch.items()}
    return model(**single, speed=speed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_each_sample_answers_as_if_alone(backend, device, kind, batch_size):
    model = fbk.patch(tiny_model(kind, device=device))
    spread_branches(model)
    batch = random_batch(batch_size, 29, _pad_id(model), device=device)
    order = torch.randperm(batch_size, device=device)
    shuffled = {k: v[order] for k, v in batch.items()}
    speed = _splitting_speed(exit_profile(model, [batch]).uncertainty()[:, 0])
    with torch.no_grad():
        out = model(**batch, speed=speed)
        out_shuffled = model(**shuffled, speed=speed)
        for i in range(batch_size):
            alone = _alone(model, batch, i, speed)
            if int(out.exit_layer[i]) == int(alone.exit_layer):
                torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
                continue
            # A sample whose uncertainty sits within float noise of the threshold may go either
            # way; only such a sample may leave at another layer than alone (found by nudging).
            stable = all(
                int(_alone(model, batch, i, speed + d).exit_layer) == int(alone.exit_layer) for d in (-1e-4, 1e-4)
            )
            assert not stable, f"row {i} left at layer {int(out.exit_layer[i])}, alone at {int(alone.exit_layer)}"
    # Shuffling the batch shuffles the answers, nothing else.
    assert torch.equal(out_shuffled.exit_layer, out.exit_layer[order])
    torch.testing.assert_close(out_shuffled.logits, out.logits[order], atol=1e-5, rtol=0)
    if batch_size == 64:
        assert len(set(out.exit_layer.tolist())) > 1, "the test needs a mix of exit layers to mean anything"


@pytest.mark.parametrize(
    "criterion,temperature,patience,students",
    [("max_prob", 0.5, 1, None), ("margin", 1.0, 2, None), ("entropy", 1.0, 1, (3, 4)), ("margin", 0.5, 2, (1, 3, 5))],
)
def test_each_sample_answers_as_if_alone_under_other_rules(backend, device, criterion, temperature, patience, students):
    """With another criterion, a temperature, patience (the streak state compacted with the rows)
    and a subset of the students, a batch still answers each row as that row alone, and a shuffle
    only shuffles."""
    rule = fbk.ExitRule(criterion, temperature, patience, students=students)
    model = fbk.patch(tiny_model("bert", layers=6, device=device), exit_rule=rule)
    spread_branches(model)
    batch = random_batch(48, 29, device=device)
    order = torch.randperm(48, device=device)
    evaluated = [layer - 1 for layer in rule.student_layers(6)]
    u = exit_profile(model, [batch]).uncertainty(criterion, temperature)[:, evaluated]
    with torch.no_grad():
        # A speed that splits the batch: with patience and few students, the median alone may
        # let everyone (or no one) leave at the same layer, which would test nothing.
        for quantile in (0.5, 0.65, 0.8, 0.9, 0.35):
            speed = float(u.flatten().quantile(quantile))
            out = model(**batch, speed=speed)
            if len(set(out.exit_layer.tolist())) > 1:
                break
        close = ((u - speed).abs().min(1).values < 1e-4).to(device)
        shuffled = model(**{k: v[order] for k, v in batch.items()}, speed=speed)
        for i in torch.nonzero(~close).flatten()[:12].tolist():
            alone = _alone(model, batch, i, speed)
            assert int(out.exit_layer[i]) == int(alone.exit_layer), i
            torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(shuffled.exit_layer[~close[order]], out.exit_layer[order][~close[order]])
    assert len(set(out.exit_layer.tolist())) > 1, "the test needs a mix of exit layers to mean anything"


def test_default_speed_and_explicit_speed(backend, device):
    model = fbk.patch(tiny_model("bert", device=device), exit_rule=fbk.ExitRule(speed=1.0))
    rig_student(model, 1, confident=True)
    batch = random_batch(4, 6, device=device)
    with torch.no_grad():
        assert (model(**batch).exit_layer == 1).all()
        assert (model(**batch, speed=0.0).exit_layer == 4).all()


def test_unpatch_restores_exactly():
    model = tiny_model("bert")
    keys_before = set(model.state_dict())
    batch = random_batch(6, 10)
    with torch.no_grad():
        expected = model(**batch).logits
        fbk.patch(model)
        spread_branches(model)
        fbk.unpatch(model)
        after = model(**batch)
    assert type(after).__name__ == "SequenceClassifierOutput"
    assert torch.equal(after.logits, expected)
    assert set(model.state_dict()) == keys_before
    assert not fbk.is_patched(model)
    assert "forward" not in model.__dict__ and "save_pretrained" not in model.__dict__


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher", ["model", "branch"])
def test_save_load_round_trip(tmp_path, kind, teacher):
    rule = fbk.ExitRule("margin", patience=2, speed=0.4, students=(1, 3))
    model = fbk.patch(tiny_model(kind), teacher=teacher, exit_rule=rule)
    spread_branches(model)
    model.save_pretrained(tmp_path)
    loaded = fbk.from_pretrained(tmp_path)
    assert fbk.fastbert_config(loaded) == fbk.fastbert_config(model)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    batch = random_batch(16, 21, _pad_id(model))
    with torch.no_grad():
        for speed in (0.0, 0.5, 0.9):
            a, b = model(**batch, speed=speed), loaded(**batch, speed=speed)
            # The weights are bit-identical (above); outputs agree to float32 rounding, since BLAS
            # may take another code path for differently aligned buffers (seen: 1 ulp).
            torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)
            close_call = (a.uncertainty - speed).abs() < 1e-5
            assert ((a.exit_layer == b.exit_layer) | close_call).all()


def test_saved_checkpoint_still_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = fbk.patch(tiny_model("bert"))
    model.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = random_batch(3, 8)
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, model(**batch, speed=0.0).logits)


def test_branch_teacher_mode_uses_last_branch():
    model = fbk.patch(tiny_model("bert"), teacher="branch")
    assert len(model.fastbert_branches) == 4 and len(fbk.students(model)) == 3
    batch = random_batch(5, 7)
    with torch.no_grad():
        out = model(**batch, speed=0.0)
    assert torch.equal(out.exit_layer, torch.full((5,), 4))
    mask = batch["attention_mask"]
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
        expected = model.fastbert_branches[-1](hidden, mask)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)


def _frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fastbert_branches.")}


@pytest.mark.parametrize("teacher", ["model", "branch"])
def test_distillation_lowers_kl_and_freezes_backbone(teacher):
    model = fbk.patch(tiny_model("bert"), teacher=teacher)
    if teacher == "branch":
        with torch.no_grad():
            for p in model.fastbert_branches[-1].parameters():
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    train = [random_batch(16, 20) for _ in range(24)]
    held_out = [random_batch(32, 20) for _ in range(2)]
    before_state = _frozen_state(model)
    teacher_branch = {k: v.clone() for k, v in model.fastbert_branches[-1].state_dict().items()}
    kl_before = fbk.student_kl(model, held_out)
    history = fbk.distill(model, train, epochs=3, lr=3e-3, progress=False)
    kl_after = fbk.student_kl(model, held_out)
    assert history.steps == 72 and len(history.lr) == 72
    assert history.lr[-1] < history.lr[10]  # decays over this run's own steps
    assert (kl_after < 0.7 * kl_before).all(), (kl_before, kl_after)
    for k, v in _frozen_state(model).items():
        assert torch.equal(v, before_state[k]), k
    if teacher == "branch":
        for k, v in model.fastbert_branches[-1].state_dict().items():
            assert torch.equal(v, teacher_branch[k])


def test_distillation_label_term():
    """With a label weight w, each student's loss gains w x its cross-entropy against the labels."""
    from fastbert_kernels.training import _distillation_loss

    model = fbk.patch(tiny_model("bert"))
    batch = random_batch(8, 9)
    batch["labels"] = torch.randint(0, 3, (8,))
    with torch.no_grad():
        kl, rows = _distillation_loss(model, batch)
        both, _ = _distillation_loss(model, batch, 0.5)
        arch_states = [
            s(h, batch["attention_mask"]) for s, h in zip(fbk.students(model), _states(model, batch), strict=False)
        ]
        ce = sum(torch.nn.functional.cross_entropy(x, batch["labels"], reduction="sum") for x in arch_states)
    assert rows == 8
    torch.testing.assert_close(both, kl + 0.5 * ce, atol=1e-4, rtol=1e-5)
    texts = [f"w{i} w{i + 1}" for i in range(8)]
    with pytest.raises(ValueError, match="needs labels"):
        fbk.distill(model, [{k: v for k, v in batch.items() if k != "labels"}], label_weight=1.0, progress=False)
    with pytest.raises(ValueError, match="label_weight is 0"):
        fbk.distill(model, texts, word_tokenizer(), labels=[0] * 8, progress=False)
    history = fbk.distill(model, [batch], label_weight=1.0, progress=False, epochs=2)
    assert history.steps == 2 and history.loss[-1] < history.loss[0]


def _states(model, batch):
    from fastbert_kernels.architectures import architecture_for
    from fastbert_kernels.encoder import all_layer_states, embed

    arch = architecture_for(model)
    inputs = embed(model, arch, batch["input_ids"], batch["attention_mask"], None)
    return all_layer_states(model, arch, inputs)


def test_distill_from_texts_with_tokenizer(tmp_path):
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 90, (int(torch.randint(3, 15, ())),))) for _ in range(40)]
    model = fbk.patch(tiny_model("bert"))
    history = fbk.distill(model, texts, tokenizer, batch_size=8, epochs=1, progress=False)
    assert history.steps == 5 and all(torch.isfinite(torch.tensor(history.loss)))


def test_fine_tune_teacher_learns_labels():
    model = tiny_model("bert", num_labels=2)
    batches = []
    for _ in range(20):
        batch = random_batch(16, 12, min_length=4)
        batch["labels"] = (batch["input_ids"][:, 0] % 2).long()  # learnable from the first token
        batches.append(batch)
    history = fbk.fine_tune(model, batches, epochs=3, lr=1e-3, progress=False)
    assert sum(history.loss[-5:]) / 5 < 0.5 * sum(history.loss[:5]) / 5


def test_patched_model_under_torch_compile(backend, device):
    import torch._dynamo

    model = fbk.patch(tiny_model("bert", device=device))
    spread_branches(model)
    batch = random_batch(12, 15, device=device)
    with torch.no_grad():
        expected = model(**batch, speed=0.5)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
            compiled = torch.compile(model, backend="aot_eager", dynamic=True)
            got = compiled(**batch, speed=0.5)
    assert torch.equal(got.exit_layer, expected.exit_layer)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_at_most_one_host_sync_per_layer(backend, device, kind, attn):
    """On a GPU every host read is a device sync: one per forward (the input check) and at most one
    per layer that runs a branch (compaction's sizes), none hidden in mask rebuilding."""
    model = fbk.patch(tiny_model(kind, attn, layers=6, device=device))
    spread_branches(model)
    batch = random_batch(32, 24, _pad_id(model), device=device)
    speed = _splitting_speed(exit_profile(model, [batch]).uncertainty()[:, 0])
    with torch.no_grad(), counting() as counts:
        out = model(**batch, speed=speed)
    branch_layers = min(int(out.exit_layer.max()), 5)
    assert counts.other_syncs == 0, counts.sync_sources
    assert counts.host_reads <= 1 + branch_layers, counts
    assert counts.launches > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_matches_reference_backend(backend, device, dtype, monkeypatch):
    """The whole adaptive forward in half precision: each backend answers as the reference does."""
    model = fbk.patch(tiny_model("bert", device=device))
    spread_branches(model)
    model.to(dtype)
    batch = random_batch(9, 13, device=device)
    with torch.no_grad():
        # Speed 1: every row whose first student is not exactly uniform leaves at layer 1, so the
        # logits compared are the first student's, computed in half precision on each backend.
        out = model(**batch, speed=1.0)
        monkeypatch.setenv(fbk.ops.ENV_VAR, "torch")
        expected = model(**batch, speed=1.0)
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.exit_layer.cpu(), torch.ones(9, dtype=torch.int64))
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-1, rtol=1e-1)
