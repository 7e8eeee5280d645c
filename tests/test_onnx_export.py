"""The adaptive model on ONNX Runtime (fastbert_kernels.onnx_export) against the torch model."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch, speed_away_from_every_uncertainty, spread_branches, tiny_model

import fastbert_kernels as fbk
from fastbert_kernels.apps.benchmarking import exit_rule
from fastbert_kernels.onnx_export import MANIFEST, OnnxFastBert, export_onnx, quantize_onnx
from fastbert_kernels.profile import exit_profile

pytest.importorskip("onnxruntime", reason="the onnx extra (requirements/onnx.txt) is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra (requirements/onnx.txt) is not installed")

RULES = [
    fbk.ExitRule(),
    fbk.ExitRule(criterion="margin", temperature=0.5, patience=2),
    fbk.ExitRule(criterion="max_prob", students=(2, 3)),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A patched tiny BERT with spread students and its float export (exported once: ~45 s). Its
    layers are wider than the branches, so that exits save more than the students cost."""
    model = fbk.patch(tiny_model("bert", hidden=256)).eval()
    spread_branches(model)
    folder = export_onnx(model, tmp_path_factory.mktemp("onnx"))
    return model, folder


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.criterion}-p{r.patience}-{r.students}")
def test_onnx_answers_as_the_torch_model(exported, rule):
    model, folder = exported
    batches = [random_batch(int(torch.randint(1, 9, ())), int(torch.randint(3, 14, ()))) for _ in range(4)]
    speed = speed_away_from_every_uncertainty(model, batches, rule)
    runner = OnnxFastBert(folder, threads=1, rule=rule.replace(speed=speed))
    for batch in batches:
        with torch.no_grad(), exit_rule(model, rule.replace(speed=speed)):
            expected = model(**batch)
        logits, layers = runner(batch["input_ids"], batch["attention_mask"])
        assert torch.equal(layers, expected.exit_layer), speed
        torch.testing.assert_close(logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_onnx_speed_zero_is_the_full_model_and_rows_keep_their_order(exported):
    model, folder = exported
    runner = OnnxFastBert(folder)
    batch = random_batch(7, 10)
    with torch.no_grad():
        expected = model(**batch, speed=0.0).logits
    logits, layers = runner(batch["input_ids"], batch["attention_mask"], speed=0.0)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert (layers == 4).all()
    # Reversed rows give the reversed answers: no row is lost, duplicated or moved.
    flipped = {k: v.flip(0) for k, v in batch.items()}
    again, again_layers = runner(flipped["input_ids"], flipped["attention_mask"], speed=0.7)
    logits, layers = runner(batch["input_ids"], batch["attention_mask"], speed=0.7)
    torch.testing.assert_close(again.flip(0), logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(again_layers.flip(0), layers)


def test_onnx_profile_calibrates_and_int8_measures_against_the_float_model(exported, tmp_path):
    model, folder = exported
    batches = [random_batch(32, 12) for _ in range(3)]
    profile = OnnxFastBert(folder).exit_profile(batches)
    torch_profile = exit_profile(model, batches)
    assert torch.equal(profile.prediction, torch_profile.prediction)
    for key, values in torch_profile.uncertainties.items():
        torch.testing.assert_close(profile.uncertainties[key], values, atol=1e-4, rtol=1e-4)

    int8 = quantize_onnx(folder, tmp_path / "int8")
    runner = OnnxFastBert(int8)
    assert runner.int8 and not OnnxFastBert(folder).int8
    int8_profile = runner.exit_profile(batches, reference=model)
    assert torch.equal(int8_profile.full_answers, torch_profile.prediction[:, -1])
    found = fbk.calibrate(model, int8_profile, max_disagreement=0.5, delta=0.2, apply=False)
    # The certificate is for the int8 graphs' early answers against the float model's.
    certificate = found.certificate
    assert certificate.samples == 96 and certificate.upper_bound <= 0.5
    early = int8_profile.predictions(found.rule)
    assert certificate.estimate == pytest.approx(float((early != torch_profile.prediction[:, -1]).float().mean()))


def test_onnx_bad_input_and_folders_are_named(exported, tmp_path):
    model, folder = exported
    runner = OnnxFastBert(folder)
    with pytest.raises(ValueError, match="empty batch"):
        runner(torch.zeros(0, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64 or int32"):
        runner(torch.ones(2, 4))
    with pytest.raises(ValueError, match="position limit 64"):
        runner(torch.ones(1, 65, dtype=torch.int64))
    with pytest.raises(ValueError, match="no tokens"):
        runner(torch.ones(2, 4, dtype=torch.int64), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(FileNotFoundError, match=MANIFEST):
        OnnxFastBert(tmp_path)
    with pytest.raises(ValueError, match="already int8"):
        quantize_onnx(quantize_onnx(folder, tmp_path / "q"), tmp_path / "qq")
    with pytest.raises(ValueError, match="float model"):
        export_onnx(fbk.quantize(model, "int8"), tmp_path / "x")
