"""What users in serving paths rely on: no sample lost, duplicated or reordered; answers that do not
depend on who shared the batch; deterministic; the same across backends; clear errors for bad
input with the model still usable; thread safety; resumable distillation."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from helpers import MAX_POSITIONS, VOCAB, random_batch, spread_branches, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbert_kernels as fbk
from fastbert_kernels.ops import BACKENDS, ENV_VAR

# A fixed profile keeps the suite fast; hypothesis still draws fresh examples every run.
settings.register_profile(
    "fastbert", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("fastbert")


@functools.cache
def _model(kind: str, num_labels: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(1234 + num_labels)
    model = fbk.patch(tiny_model(kind, num_labels=num_labels))
    spread_branches(model)
    return model.to(dtype)


def _batch_from(draw_lengths: list[int], width: int, pad_id: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(draw_lengths), width), generator=generator)
    mask = torch.zeros(len(draw_lengths), width, dtype=torch.int64)
    for i, n in enumerate(draw_lengths):
        mask[i, :n] = 1
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return {"input_ids": ids, "attention_mask": mask}


batches = st.integers(1, 64).flatmap(
    lambda b: st.tuples(
        st.lists(st.integers(1, MAX_POSITIONS), min_size=b, max_size=b),
        st.integers(0, 2**31 - 1),
    )
)


@given(
    data=batches,
    speed=st.floats(0.0, 1.0),
    kind=st.sampled_from(["bert", "roberta"]),
    num_labels=st.sampled_from([2, 3, 7]),
)
def test_every_row_answered_once_in_order_as_if_alone(data, speed, kind, num_labels):
    lengths, seed = data
    model = _model(kind, num_labels)
    batch = _batch_from(lengths, max(lengths), model.config.pad_token_id or 0, seed)
    with torch.no_grad():
        out = model(**batch, speed=speed)
        again = model(**batch, speed=speed)
        n = len(lengths)
        assert out.logits.shape == (n, num_labels) and out.exit_layer.shape == (n,) and out.uncertainty.shape == (n,)
        assert torch.isfinite(out.logits).all() and ((out.exit_layer >= 1) & (out.exit_layer <= 4)).all()
        # Deterministic: the same batch gives bit-identical answers.
        assert torch.equal(out.logits, again.logits) and torch.equal(out.exit_layer, again.exit_layer)
        # Each row is answered as if it ran alone (so nothing was lost, duplicated or reordered).
        for i in torch.randperm(n)[:6].tolist():
            single = {k: v[i : i + 1, : lengths[i]] for k, v in batch.items()}
            alone = model(**single, speed=speed)
            near = [model(**single, speed=min(1.0, max(0.0, speed + d))).exit_layer for d in (-1e-4, 1e-4)]
            if all(int(x) == int(alone.exit_layer) for x in near):
                assert int(out.exit_layer[i]) == int(alone.exit_layer)
            if int(out.exit_layer[i]) == int(alone.exit_layer):
                torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)


@given(data=batches, speed=st.floats(0.05, 0.95))
def test_backends_agree(data, speed):
    lengths, seed = data
    lengths = lengths[:16]  # Triton's interpreter is slow; 16 rows are enough for agreement
    model = _model("bert", 3)
    batch = _batch_from(lengths, max(lengths), 0, seed)
    answers = {}
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        for name, backend in BACKENDS.items():
            if not (backend.available()[0] and "cpu" in backend.devices()):
                continue
            mp.setenv(ENV_VAR, name)
            answers[name] = model(**batch, speed=speed)
    reference = answers.pop("torch")
    for name, out in answers.items():
        same = out.exit_layer == reference.exit_layer
        # Decisions may differ only for rows whose uncertainty is within tolerance of the threshold.
        close_call = (reference.uncertainty - speed).abs() < 1e-3
        assert (same | close_call).all(), name
        torch.testing.assert_close(out.logits[same], reference.logits[same], atol=2e-4, rtol=2e-4)


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=24),
    speed=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_low_precision_rows_stay_in_place(lengths, speed, seed):
    model = _model("bert", 3, torch.bfloat16)
    batch = _batch_from(lengths, max(lengths), 0, seed)
    with torch.no_grad():
        out = model(**batch, speed=speed)
        shuffle = torch.randperm(len(lengths))
        shuffled = model(**{k: v[shuffle] for k, v in batch.items()}, speed=speed)
    assert out.logits.shape == (len(lengths), 3) and torch.isfinite(out.logits).all()
    # Reordering the batch reorders the answers; exits may differ only near the threshold.
    assert ((shuffled.exit_layer == out.exit_layer[shuffle]) | ((out.uncertainty[shuffle] - speed).abs() < 5e-2)).all()


# ---- bad input: a clear error, and the model still works afterwards ------------------------------


@pytest.fixture(scope="module")
def model():
    return _model("bert", 3)


def _still_works(model) -> None:
    with torch.no_grad():
        assert model(**random_batch(3, 5), speed=0.5).logits.shape == (3, 3)


BAD_CALLS = {
    "speed above 1": (lambda b: dict(b, speed=1.5), ValueError, r"speed must be in \[0, 1\]"),
    "negative speed": (lambda b: dict(b, speed=-0.1), ValueError, r"speed must be in \[0, 1\]"),
    "NaN speed": (lambda b: dict(b, speed=float("nan")), ValueError, r"speed must be in \[0, 1\], got nan"),
    "speed not a number": (lambda b: dict(b, speed="fast"), TypeError, "speed must be a real"),
    "empty batch": (
        lambda b: {"input_ids": b["input_ids"][:0], "attention_mask": b["attention_mask"][:0]},
        ValueError,
        "empty batch",
    ),
    "mask shape": (
        lambda b: dict(b, attention_mask=b["attention_mask"][:, :-1]),
        ValueError,
        "attention_mask has shape",
    ),
    "ids dtype": (lambda b: dict(b, input_ids=b["input_ids"].float()), TypeError, "input_ids must be int64 or int32"),
    "ids rank": (lambda b: dict(b, input_ids=b["input_ids"][0]), ValueError, r"input_ids must be \[batch, sequence\]"),
    "all-zero mask row": (
        lambda b: dict(b, attention_mask=b["attention_mask"].index_fill(0, torch.tensor([1]), 0)),
        ValueError,
        r"attention_mask rows \[1\] have no tokens",
    ),
    "too long": (
        lambda b: {"input_ids": torch.randint(2, VOCAB, (2, MAX_POSITIONS + 1))},
        ValueError,
        "exceeds the model's position limit 64",
    ),
    "other device": (lambda b: dict(b, input_ids=b["input_ids"].to("meta")), ValueError, "inputs are on meta"),
    "unknown argument": (lambda b: dict(b, colour="red"), TypeError, "unexpected arguments"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_rejected_clearly(model, case):
    make, error, message = BAD_CALLS[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(**make(random_batch(4, 7)))
    _still_works(model)


def test_unsupported_model_type():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    other = MPNetForSequenceClassification(
        MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(TypeError, match=r"model_type=.mpnet..* is not supported"):
        fbk.patch(other)


def test_headless_and_regression_models_rejected():
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    with pytest.raises(TypeError, match="without a sequence-classification head"):
        fbk.patch(
            BertModel(
                BertConfig(
                    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
                )
            )
        )
    regression = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=1,
        )
    )
    with pytest.raises(ValueError, match="num_labels >= 2"):
        fbk.patch(regression)


def test_patching_twice(model):
    with pytest.raises(ValueError, match="already patched"):
        fbk.patch(model)
    _still_works(model)


def test_distilling_or_unpatching_an_unpatched_model():
    plain = tiny_model("bert")
    with pytest.raises(ValueError, match=r"call fastbert_kernels\.patch"):
        fbk.distill(plain, [random_batch(2, 3)], progress=False)
    with pytest.raises(ValueError, match="not patched"):
        fbk.unpatch(plain)


def test_loading_a_directory_without_branches(tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)  # a plain checkpoint
    with pytest.raises(FileNotFoundError, match="not a FastBERT checkpoint"):
        fbk.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        fbk.from_pretrained(tmp_path / "missing")


def test_corrupted_and_mismatched_checkpoints(tmp_path):
    from fastbert_kernels.config import BRANCHES_FILE, CONFIG_FILE

    source = fbk.patch(tiny_model("bert"))
    source.save_pretrained(tmp_path / "good")
    # Corrupted branch file.
    source.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / BRANCHES_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupted"):
        fbk.from_pretrained(tmp_path / "corrupt")
    # Branches from a model with a different teacher mode (one branch more).
    other = fbk.patch(tiny_model("bert"), teacher="branch")
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "good" / BRANCHES_FILE).write_bytes((tmp_path / "other" / BRANCHES_FILE).read_bytes())
    with pytest.raises(ValueError, match="does not match this model's branches"):
        fbk.from_pretrained(tmp_path / "good")
    # Branches of another width.
    wide = fbk.patch(tiny_model("bert"), branch_size=64)
    wide.save_pretrained(tmp_path / "wide")
    source.save_pretrained(tmp_path / "narrow")
    (tmp_path / "narrow" / BRANCHES_FILE).write_bytes((tmp_path / "wide" / BRANCHES_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"size mismatch for 0\.input_proj\.weight"):
        fbk.from_pretrained(tmp_path / "narrow")
    # A config file that is not JSON, or from another format version.
    (tmp_path / "good" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fbk.from_pretrained(tmp_path / "good")
    (tmp_path / "good" / CONFIG_FILE).write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        fbk.from_pretrained(tmp_path / "good")


def test_training_mode_refuses_early_exit():
    model = fbk.patch(tiny_model("bert")).train()
    with pytest.raises(RuntimeError, match="early exit is for inference"):
        model(**random_batch(2, 4), speed=0.5)
    model.eval()
    _still_works(model)


# ---- concurrency ------------------------------------------------------------------------------------


def test_threads_with_their_own_speeds_match_sequential_runs(model):
    speeds = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    batches_ = [random_batch(16, 20) for _ in speeds]
    with torch.no_grad():
        expected = [model(**b, speed=s) for b, s in zip(batches_, speeds, strict=True)]
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(speeds))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    results[i] = model(**batches_[i], speed=speeds[i])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(speeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, exp in enumerate(expected):
        assert torch.equal(results[i].exit_layer, exp.exit_layer)
        torch.testing.assert_close(results[i].logits, exp.logits, atol=1e-6, rtol=0)


# ---- resumable distillation -------------------------------------------------------------------------


def test_interrupted_distillation_resumes_to_the_same_students(tmp_path):
    data = [random_batch(8, 12) for _ in range(10)]

    def fresh():
        torch.manual_seed(7)
        return fbk.patch(tiny_model("bert"))

    straight = fresh()
    fbk.distill(straight, data, epochs=2, lr=1e-3, progress=False, seed=3)

    interrupted = fresh()
    fbk.distill(
        interrupted,
        data,
        epochs=2,
        lr=1e-3,
        progress=False,
        seed=3,
        checkpoint_dir=tmp_path,
        checkpoint_every=4,
        max_steps=7,
    )
    resumed = fresh()  # a new process would start from scratch weights, then load the checkpoint
    history = fbk.distill(
        resumed, data, epochs=2, lr=1e-3, progress=False, seed=3, checkpoint_dir=tmp_path, checkpoint_every=4
    )
    assert history.steps == 20
    for (k1, v1), (k2, v2) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert k1 == k2
        torch.testing.assert_close(v1, v2, atol=0, rtol=0, msg=k1)
