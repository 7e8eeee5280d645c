"""A patched model with the Hugging Face tools users bring: Trainer, pipelines, pickling, gradients,
loss conventions, the inputs Hugging Face accepts, and checkpoints shared with plain models."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import VOCAB, random_batch, rig_student, spread_branches, tiny_model, word_tokenizer
from transformers import (
    BertConfig,
    BertForMultipleChoice,
    BertForTokenClassification,
    RobertaConfig,
    RobertaForTokenClassification,
)

import fastbert_kernels as fbk


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, length: int = 12) -> None:
        batch = random_batch(n, length)
        self.rows = [
            {"input_ids": batch["input_ids"][i], "attention_mask": batch["attention_mask"][i], "labels": i % 3}
            for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_trainer_evaluate_predict_train(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = fbk.patch(tiny_model("bert"), exit_rule=fbk.ExitRule(speed=0.5))
    spread_branches(model)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=8, per_device_train_batch_size=8, max_steps=2,
        report_to=[], use_cpu=True, save_strategy="no",
    )  # fmt: skip

    def compute_metrics(prediction) -> dict:
        # The standard recipe for the unpatched model: predictions are the logits.
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=args, eval_dataset=_Dataset(), compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    predicted = trainer.predict(_Dataset())
    assert predicted.predictions.shape == (24, 3)
    # Whoever asks gets the exit layers too.
    trainer.compute_metrics = None
    everything = trainer.predict(_Dataset(), ignore_keys=[])
    logits, exit_layer, uncertainty = everything.predictions
    assert (
        logits.shape == (24, 3)
        and exit_layer.shape == (24,)
        and uncertainty.shape == (24,)
        and set(exit_layer.tolist()) <= {1, 2, 3, 4}
    )
    # Training the teacher with Trainer runs at speed 0 (the default speed is for inference).
    fbk.fastbert_config(model).exit_rule = fbk.ExitRule(speed=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=_Dataset())
    assert trainer.train().training_loss > 0


def test_trainer_loss_kwargs_follow_hugging_face():
    model = fbk.patch(tiny_model("bert"))
    batch = random_batch(6, 9)
    labels = torch.tensor([0, 1, 2, 0, 1, -100])
    with torch.no_grad():
        out = model(**batch, labels=labels, speed=0.0, num_items_in_batch=torch.tensor(5))
        plain = fbk.unpatch(model)(**batch, labels=labels, num_items_in_batch=torch.tensor(5))
    torch.testing.assert_close(out.loss, plain.loss, atol=1e-6, rtol=1e-6)


def test_float_labels_are_refused_not_given_another_loss():
    model = fbk.patch(tiny_model("bert"))
    with pytest.raises(ValueError, match="single-label"):
        model(**random_batch(4, 6), labels=torch.rand(4, 3), speed=0.0)


@pytest.mark.parametrize("protocol", [pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip_in_process(protocol):
    model = fbk.patch(tiny_model("bert"))
    spread_branches(model)
    batch = random_batch(7, 11)
    with torch.no_grad():
        expected = model(**batch, speed=0.4)
        clone = pickle.loads(pickle.dumps(model, protocol=protocol))
        got = clone(**batch, speed=0.4)
    assert torch.equal(got.exit_layer, expected.exit_layer)
    assert torch.equal(got.logits, expected.logits)
    assert fbk.is_patched(clone) and clone.forward.args[0] is clone  # bound to the copy, not the original


def test_torch_save_loads_in_a_fresh_process(tmp_path):
    model = fbk.patch(tiny_model("bert"))
    spread_branches(model)
    batch = random_batch(5, 8)
    with torch.no_grad():
        expected = model(**batch, speed=0.4)
    torch.save({"model": model, "batch": batch}, tmp_path / "model.pt")
    torch.save(expected.logits, tmp_path / "expected.pt")
    # Unpickling a whole model is for the user's own files (weights_only=False); the library never does it.
    script = (
        f"import torch; d = torch.load(r'{tmp_path}/model.pt', weights_only=False); torch.set_grad_enabled(False); "
        "out = d['model'](**d['batch'], speed=0.4); "
        f"torch.testing.assert_close(out.logits, torch.load(r'{tmp_path}/expected.pt'), atol=1e-6, rtol=1e-6)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_gradients_through_the_adaptive_forward_match_the_reference(backend, device, monkeypatch):
    """Attribution on an eval-mode model: gradients at speed > 0 are the reference backend's."""
    model = fbk.patch(tiny_model("bert", device=device))
    spread_branches(model)
    batch = random_batch(6, 10, device=device)
    embeds = model.bert.embeddings.word_embeddings(batch["input_ids"]).detach()

    def gradients() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = embeds.clone().requires_grad_(True)
        model.zero_grad()
        out = model(inputs_embeds=x, attention_mask=batch["attention_mask"], speed=0.7)
        out.logits.max(-1).values.sum().backward()
        return x.grad, model.bert.encoder.layer[0].output.dense.weight.grad.clone(), out.exit_layer

    grad, layer_grad, exits = gradients()
    monkeypatch.setenv(fbk.ops.ENV_VAR, "torch")
    ref_grad, ref_layer_grad, ref_exits = gradients()
    assert torch.equal(exits, ref_exits)
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer_grad, ref_layer_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_early_exit_in_train_mode_raises_under_any_grad_mode(grad_mode):
    model = fbk.patch(tiny_model("bert")).train()
    with grad_mode(), pytest.raises(RuntimeError, match=r"model\.eval"):
        model(**random_batch(3, 5), speed=0.5)


def test_pipeline_runs_at_a_speed_with_exit_layers():
    model = fbk.patch(tiny_model("bert"))
    rig_student(model, 1, confident=True)
    tokenizer = word_tokenizer()
    classify = fbk.pipeline(model, tokenizer, speed=0.5)
    (single,) = classify("w1 w2 w3")
    assert single["exit_layer"] == 1 and set(single) == {"label", "score", "exit_layer"}
    several = classify(["w1 w2", "w3 w4 w5", "w6"], speed=0.0, batch_size=2)
    assert [r["exit_layer"] for r in several] == [4, 4, 4]
    # A plain pipeline runs at the model's default speed.
    from transformers import pipeline

    fbk.fastbert_config(model).exit_rule = fbk.ExitRule(speed=0.5)
    plain = pipeline("text-classification", model=model, tokenizer=tokenizer)
    assert plain("w1 w2")[0]["label"] == single["label"]
    with pytest.raises(ValueError, match="speed"):
        classify("w1", speed=1.5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: BertForTokenClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=64, num_labels=3)),
        lambda: RobertaForTokenClassification(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                            num_attention_heads=4, intermediate_size=64, num_labels=3)),
        lambda: BertForMultipleChoice(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64)),
    ],
    ids=["bert-token", "roberta-token", "bert-multiple-choice"],
)  # fmt: skip
def test_patch_refuses_heads_it_cannot_serve(build):
    with pytest.raises(TypeError, match="sequence-classification head"):
        fbk.patch(build())


def test_students_of_another_model_are_refused(tmp_path):
    patched = fbk.patch(tiny_model("bert"))
    patched.save_pretrained(tmp_path)
    fbk.from_pretrained(tmp_path)  # its own students load
    tiny_model("bert").save_pretrained(tmp_path)  # another model over it; the FastBERT files stay
    with pytest.raises(ValueError, match="not the ones its FastBERT students were saved with"):
        fbk.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "speed", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), 1, 0]
)
def test_speed_accepts_any_real_scalar(speed):
    model = fbk.patch(tiny_model("bert"))
    spread_branches(model)
    batch = random_batch(4, 7)
    with torch.no_grad():
        out = model(**batch, speed=speed)
        expected = model(**batch, speed=float(speed))
    assert torch.equal(out.exit_layer, expected.exit_layer)


@pytest.mark.parametrize("speed", [torch.tensor([[0.5]]), "0.5", None.__class__, True])
def test_speed_of_the_wrong_kind_says_so(speed):
    model = fbk.patch(tiny_model("bert"))
    with pytest.raises(TypeError, match="speed must be a real"):
        model(**random_batch(2, 5), speed=speed)


def test_position_ids_broadcast_like_hugging_face():
    model = fbk.patch(tiny_model("bert"))
    spread_branches(model)
    batch = random_batch(5, 9)
    positions = torch.arange(9)[None, :]
    with torch.no_grad():
        out = model(**batch, position_ids=positions, speed=0.3)
        expected = model(**batch, position_ids=positions.expand(5, 9), speed=0.3)
        plain = fbk.unpatch(model)(**batch, position_ids=positions).logits
        fbk.patch(model)
        spread_branches(model)
        at_zero = model(**batch, position_ids=positions, speed=0.0).logits
    assert torch.equal(out.logits, expected.logits)
    torch.testing.assert_close(at_zero, plain, atol=1e-5, rtol=0)


def test_distill_takes_series_and_arrays_but_not_one_string():
    pd = pytest.importorskip("pandas")

    model = fbk.patch(tiny_model("bert"))
    tokenizer_texts = [" ".join(f"w{i}" for i in range(k, k + 4)) for k in range(6)]
    tokenizer = word_tokenizer()
    for texts in (pd.Series(tokenizer_texts), np.array(tokenizer_texts)):
        history = fbk.distill(model, texts, tokenizer, epochs=1, batch_size=3, progress=False)
        assert history.steps == 2
    with pytest.raises(TypeError, match="one string"):
        fbk.distill(model, "a single review", tokenizer, progress=False)


def test_export_at_speed_zero_equals_the_model():
    """Speed 0 exports with torch.export (what torch.onnx.export(dynamo=True) builds on), and the
    exported program answers as the model does."""
    model = fbk.patch(tiny_model("bert")).eval()
    batch = random_batch(3, 7)
    exported = torch.export.export(model, args=(), kwargs={**batch, "speed": 0.0}, strict=False)
    with torch.no_grad():
        expected = model(**batch, speed=0.0).logits
        got = exported.module()(**batch, speed=0.0)
    torch.testing.assert_close(got["logits"] if isinstance(got, dict) else got.logits, expected)


def test_export_at_speed_above_zero_fails_in_one_line():
    model = fbk.patch(tiny_model("bert"))
    batch = random_batch(2, 6)
    with pytest.raises(Exception, match=r"torch\.export supports a patched model at speed=0 only"):
        torch.export.export(model, args=(), kwargs={**batch, "speed": 0.5}, strict=False)


def test_per_row_speed_answers_each_row_at_its_own_speed(backend, device):
    model = fbk.patch(tiny_model("bert", device=device))
    spread_branches(model)
    batch = random_batch(12, 10, device=device)
    speeds = torch.tensor([0.0, 0.3, 0.6, 0.95] * 3, device=device)
    with torch.no_grad():
        out = model(**batch, speed=speeds)
        for value in speeds.unique().tolist():
            rows = speeds == value
            alone = model(**batch, speed=value)
            assert torch.equal(out.exit_layer[rows], alone.exit_layer[rows]), value
            torch.testing.assert_close(out.logits[rows], alone.logits[rows], atol=1e-5, rtol=1e-5)
    assert (out.exit_layer[speeds == 0] == 4).all()


@pytest.mark.parametrize(
    "speed,error,message",
    [
        (torch.tensor([0.5, 0.5]), ValueError, "shape"),
        (torch.tensor([0, 1, 0]), TypeError, "float tensor"),
        (torch.tensor([0.5, 1.5, 0.2]), ValueError, r"in \[0, 1\]"),
        (torch.tensor([0.5, float("nan"), 0.2]), ValueError, r"in \[0, 1\]"),
    ],
)
def test_per_row_speed_checks(speed, error, message):
    model = fbk.patch(tiny_model("bert"))
    with pytest.raises(error, match=message):
        model(**random_batch(3, 5), speed=speed)
