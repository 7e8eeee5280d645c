"""A patched model and int8 dynamic quantisation, in either order: the encoder's Linear layers
become int8, the students stay float, and everything the package guarantees still holds."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import random_batch, speed_away_from_every_uncertainty, spread_branches, tiny_model

import fastbert_kernels as fbk
from fastbert_kernels.branch import BranchLinear
from fastbert_kernels.calibration import exit_profile


def _quantize(model):
    with warnings.catch_warnings():  # torch.ao's deprecation notice
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _is_int8(module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized")


@pytest.mark.parametrize("order", ["patch then quantize", "quantize then patch"])
def test_int8_encoder_with_float_students(order):
    base = tiny_model("bert").eval()
    reference = _quantize(copy.deepcopy(base))  # the int8 model a user would run without this package
    if order == "patch then quantize":
        patched = fbk.patch(copy.deepcopy(base)).eval()
        spread_branches(patched)
        model = _quantize(patched)
    else:
        model = fbk.patch(_quantize(copy.deepcopy(base))).eval()
        spread_branches(model)
    assert _is_int8(model.bert.encoder.layer[0].attention.self.query)
    for student in fbk.students(model):
        assert all(type(m) is BranchLinear for m in student.children())
        assert all(p.dtype == torch.float32 for p in student.parameters())
    batch = random_batch(16, 13)
    with torch.no_grad():
        # Speed 0 is the int8 model itself.
        torch.testing.assert_close(model(**batch, speed=0.0).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)
        # The exits on the int8 encoder are what the profile of the same model predicts.
        profile = exit_profile(model, [batch])
        speed = float(profile.uncertainty()[:, :-1].median())
        out = model(**batch, speed=speed)
    rule = fbk.ExitRule(speed=speed)
    close = (profile.uncertainty()[:, :-1] - speed).abs().min(1).values < 1e-4
    assert torch.equal(out.exit_layer[~close], profile.exit_layers(rule)[~close])
    assert len(set(out.exit_layer.tolist())) > 1, "the test needs a mix of exit layers to mean anything"


def test_a_quantised_branch_is_refused_with_a_message():
    model = fbk.patch(tiny_model("bert")).eval()
    fbk.fastbert_config(model).students_trained = True
    student = fbk.students(model)[0]
    student.qkv = torch.ao.nn.quantized.dynamic.Linear(student.qkv.in_features, student.qkv.out_features)
    with pytest.raises(TypeError, match="needs float Linear layers"), torch.no_grad():
        model(**random_batch(2, 5), speed=0.5)


def _distilled_int8():
    # Layers wider than the branches, as in real models, so that exits can save work at all.
    model = fbk.patch(tiny_model("bert", layers=4, hidden=256), branch_size=16).eval()
    spread_branches(model)
    fbk.fastbert_config(model).students_trained = True
    return model, fbk.quantize(model)


def test_quantize_makes_an_int8_copy_and_says_so():
    model, q = _distilled_int8()
    assert fbk.fastbert_config(q).quantization == "int8" and fbk.fastbert_config(model).quantization is None
    assert not _is_int8(model.bert.encoder.layer[0].output.dense)  # the float model is left alone
    assert _is_int8(q.bert.encoder.layer[0].output.dense)
    with pytest.raises(ValueError, match="already quantised"):
        fbk.quantize(q)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        fbk.quantize(model, "int4")
    with pytest.raises(ValueError, match="not patched"):
        fbk.quantize(tiny_model("bert"))


def test_an_int8_checkpoint_saves_float_weights_and_loads_the_same_int8_model(tmp_path):
    from helpers import word_tokenizer

    model, q = _distilled_int8()
    fbk.fastbert_config(q).exit_rule = fbk.ExitRule(speed=0.4, students=(2, 3))
    fbk.save_pretrained(q, tmp_path / "c", tokenizer=word_tokenizer())
    loaded, _ = fbk.load_checkpoint(tmp_path / "c")
    assert fbk.fastbert_config(loaded) == fbk.fastbert_config(q)
    assert _is_int8(loaded.bert.encoder.layer[0].output.dense)
    batch = random_batch(16, 13)
    with torch.no_grad():
        for speed in (0.0, 0.4, 0.8):
            a, b = q(**batch, speed=speed), loaded(**batch, speed=speed)
            assert torch.equal(a.exit_layer, b.exit_layer) and torch.equal(a.logits, b.logits)
    # The saved base weights are the float model's: plain transformers loads them as usual.
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c", local_files_only=True)
    assert torch.equal(plain.bert.encoder.layer[0].output.dense.weight, model.bert.encoder.layer[0].output.dense.weight)
    # A model quantised by hand cannot be saved: its float weights are gone.
    fbk.fastbert_config(model).quantization = "int8"
    with pytest.raises(ValueError, match="float model is unknown"):
        fbk.save_pretrained(model, tmp_path / "d", tokenizer=word_tokenizer())


def test_calibrating_an_int8_model_measures_against_the_float_model():
    """The reference answers of an int8 model's profile are the float model's, so at speed 0 the
    measured disagreement is quantisation's own, and the certified risk includes it."""
    model, q = _distilled_int8()
    batches = [random_batch(64, 13) for _ in range(4)]
    profile = exit_profile(q, batches)
    with torch.no_grad():
        float_answers = torch.cat([model(**b, speed=0.0).logits.argmax(-1) for b in batches])
        int8_answers = torch.cat([q(**b, speed=0.0).logits.argmax(-1) for b in batches])
    assert torch.equal(profile.full_answers, float_answers)
    assert torch.equal(profile.prediction[:, -1], int8_answers)
    quantization_cost = float((int8_answers != float_answers).float().mean())
    found = fbk.calibrate(q, profile, max_disagreement=0.3, delta=0.2, apply=False)
    measured = float((profile.predictions(found.rule) != float_answers).float().mean())
    assert found.certificate.estimate == pytest.approx(measured)
    assert found.certificate.upper_bound >= quantization_cost


def test_bf16_autocast_on_cpu_answers_as_the_reference_backend(monkeypatch):
    """Under CPU bf16 autocast the layers return bf16 or float32 hidden states; the exit head
    takes either (its folded weights are made outside autocast), speed 0 is the unpatched model
    under the same autocast, and every backend decides as the reference does."""
    model = fbk.patch(tiny_model("bert", hidden=64)).eval()
    spread_branches(model)
    unpatched = fbk.unpatch(copy.deepcopy(model)).eval()
    batch = random_batch(6, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(**batch, speed=0.0).logits, unpatched(**batch).logits.float())
        # bf16 moves an uncertainty by up to about 1e-2 between backends: decide away from them all.
        speed = speed_away_from_every_uncertainty(model, [batch], fbk.ExitRule(), gap=0.02)
        out = model(**batch, speed=speed)
        monkeypatch.setenv(fbk.ops.ENV_VAR, "torch")
        expected = model(**batch, speed=speed)
    assert torch.equal(out.exit_layer, expected.exit_layer)
    torch.testing.assert_close(out.logits, expected.logits, atol=5e-2, rtol=5e-2)
    # The folding made under autocast is the float32 one a call outside autocast uses.
    folded = fbk.students(model)[0].folded_weights(torch.float32)
    assert all(t.dtype == torch.float32 for t in folded)
