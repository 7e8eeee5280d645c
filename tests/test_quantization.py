"""A patched model and int8 dynamic quantisation, in either order: the encoder's Linear layers
become int8, the students stay float, and everything the package guarantees still holds."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import random_batch, spread_branches, tiny_model

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
