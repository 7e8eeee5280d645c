"""Every supported model type beyond BERT and RoBERTa (tiny random configs, no downloads): each
guarantee the BERT path has, through the one model-type table."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, spread_branches, tiny_model

import fastbert_kernels as fbk
from fastbert_kernels.calibration import exit_profile
from fastbert_kernels.state import BRANCHES_ATTR

# model type -> the attention backends it supports in transformers (DeBERTa-v2: eager only).
KINDS = {
    "camembert": ("sdpa", "eager"),
    "distilbert": ("sdpa", "eager"),
    "albert": ("sdpa", "eager"),
    "electra": ("sdpa", "eager"),
    "deberta-v2": ("eager",),
    "modernbert": ("sdpa", "eager"),
}
CASES = [(kind, attn) for kind, attns in KINDS.items() for attn in attns]


def _model(kind: str, attn: str = "sdpa", device="cpu"):
    return tiny_model(kind, KINDS[kind][0] if attn not in KINDS[kind] else attn, device=device)


def _batch(model, size: int, device="cpu") -> dict[str, torch.Tensor]:
    # Lengths up to 29: past ModernBERT's 8-token window, so its sliding-window layers are exercised.
    return random_batch(size, 29, model.config.pad_token_id or 0, device=device)


def _splitting_speed(model, batch) -> float:
    u = exit_profile(model, [batch]).uncertainty()[:, 0].sort().values
    return float(u[u.numel() // 2 - 1] + u[u.numel() // 2]) / 2 if u.numel() > 1 else float(u[0]) / 2


def test_the_table_lists_every_type():
    assert set(KINDS) | {"bert", "roberta", "xlm-roberta"} == set(fbk.ARCHITECTURES)


@pytest.mark.parametrize("kind,attn", CASES)
def test_speed_zero_equals_unpatched(kind, attn):
    model = _model(kind, attn)
    batch = _batch(model, 9)
    with torch.no_grad():
        expected = model(**batch).logits
        fbk.patch(model)
        spread_branches(model)
        out = model(**batch, speed=0.0)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert (out.exit_layer == 4).all()


@pytest.mark.parametrize("kind,attn", CASES)
@pytest.mark.parametrize("size", [1, 64])
def test_each_sample_answers_as_if_alone(kind, attn, size):
    model = fbk.patch(_model(kind, attn))
    spread_branches(model)
    batch = _batch(model, size)
    speed = _splitting_speed(model, batch)
    order = torch.randperm(size)
    with torch.no_grad():
        out = model(**batch, speed=speed)
        shuffled = model(**{k: v[order] for k, v in batch.items()}, speed=speed)
        for i in range(size):
            length = int(batch["attention_mask"][i].sum())
            alone = model(**{k: v[i : i + 1, :length] for k, v in batch.items()}, speed=speed)
            if int(alone.exit_layer) != int(out.exit_layer[i]):
                # Only a sample within float noise of the threshold may differ (found by nudging).
                nudged = {
                    int(model(**{k: v[i : i + 1, :length] for k, v in batch.items()}, speed=speed + d).exit_layer)
                    for d in (-1e-4, 1e-4)
                }
                assert len(nudged) == 2, (
                    f"row {i}: layer {int(out.exit_layer[i])} in the batch, {int(alone.exit_layer)} alone"
                )
                continue
            torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(shuffled.exit_layer, out.exit_layer[order])
    torch.testing.assert_close(shuffled.logits, out.logits[order], atol=1e-5, rtol=0)
    if size == 64:
        assert len(set(out.exit_layer.tolist())) > 1, "the test needs a mix of exit layers to mean anything"


@pytest.mark.parametrize("kind", KINDS)
def test_every_backend_agrees_with_the_reference(backend, device, kind, monkeypatch):
    model = fbk.patch(_model(kind, device=device))
    spread_branches(model)
    batch = _batch(model, 16, device=device)
    speed = _splitting_speed(model, batch)
    with torch.no_grad():
        out = model(**batch, speed=speed)
        monkeypatch.setenv(fbk.ops.ENV_VAR, "torch")
        expected = model(**batch, speed=speed)
    same = out.exit_layer == expected.exit_layer
    assert same.float().mean() > 0.9  # decisions differ only within float noise of the threshold
    torch.testing.assert_close(out.logits[same], expected.logits[same], atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_distillation_lowers_kl_and_freezes_the_rest(kind):
    model = fbk.patch(_model(kind))
    batches = [_batch(model, 16) for _ in range(4)]
    before_state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(BRANCHES_ATTR)}
    before = fbk.student_kl(model, batches)
    fbk.distill(model, batches, epochs=3, lr=3e-3, progress=False)
    after = fbk.student_kl(model, batches)
    assert after.sum() < before.sum()
    for key, value in model.state_dict().items():
        if not key.startswith(BRANCHES_ATTR):
            assert torch.equal(value, before_state[key]), key


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_and_unpatch_are_exact(kind, tmp_path):
    model = fbk.patch(_model(kind))
    spread_branches(model)
    batch = _batch(model, 8)
    with torch.no_grad():
        plain = fbk.unpatch(model)(**batch).logits
        fbk.patch(model)
        spread_branches(model)
        expected = model(**batch, speed=0.4)
        model.save_pretrained(tmp_path)
        loaded = fbk.from_pretrained(tmp_path)(**batch, speed=0.4)
        restored = fbk.unpatch(model)(**batch).logits
    assert torch.equal(loaded.exit_layer, expected.exit_layer)
    torch.testing.assert_close(loaded.logits, expected.logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(restored, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile(kind):
    import torch._dynamo

    model = fbk.patch(_model(kind))
    spread_branches(model)
    batch = _batch(model, 8)
    with torch.no_grad():
        expected = model(**batch, speed=0.5)
        torch._dynamo.reset()
        got = torch.compile(model, backend="eager")(**batch, speed=0.5)
    assert torch.equal(got.exit_layer, expected.exit_layer)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
