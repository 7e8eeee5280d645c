"""A user's ordinary mistakes get a clear error, never a silently wrong answer, a crash or a hang:
checkpoints without (or with another) tokenizer, untrained students, corpus files and resumed
jobs, labels that cannot be right, engine futures and arguments, the command line, config files.
Each test names the class of mistake it holds the package to."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from helpers import layers_wait_for, random_batch, spread_branches, tiny_model, word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbert_kernels as fbk
from fastbert_kernels import corpus
from fastbert_kernels.apps.cli import main as cli
from fastbert_kernels.calibration import exit_profile
from fastbert_kernels.config import CONFIG_FILE
from fastbert_kernels.serving import Engine, EngineClosedError
from fastbert_kernels.state import UntrainedStudentsWarning

# Every line separator str.splitlines() knows, besides \n: a corpus line may hold any of them.
SEPARATORS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def _trained_model(num_labels: int = 3):
    model = fbk.patch(tiny_model("bert", num_labels=num_labels))
    spread_branches(model)
    return model.eval()


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    directory = tmp_path / "ckpt"
    fbk.save_pretrained(_trained_model(), directory, tokenizer=word_tokenizer())
    return directory


# ---- checkpoints and their tokenizer ---------------------------------------------------------


def test_checkpoint_without_its_tokenizer_is_refused(tmp_path):
    """transformers would make up a 5-token placeholder tokenizer, every word the same id."""
    model = _trained_model()
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer.*fastbert_kernels\.save_pretrained"):
        fbk.load_checkpoint(tmp_path / "bare")
    with pytest.raises(ValueError, match="pass the model's tokenizer"):
        fbk.save_pretrained(model, tmp_path / "again")


def test_checkpoint_with_another_models_tokenizer_is_refused(checkpoint, tmp_path):
    other = tmp_path / "other"
    model = fbk.patch(tiny_model("bert"))
    model.config.vocab_size = 30522  # as a checkpoint of a real BERT says, with the tiny word tokenizer beside it
    fbk.save_pretrained(model, other, tokenizer=word_tokenizer())
    config = json.loads((other / "config.json").read_text())
    assert config["vocab_size"] == 30522
    with pytest.raises(ValueError, match="97 tokens but the model's embedding has 30522 rows"):
        fbk.serialization.load_tokenizer(other, model)


def test_saved_checkpoint_loads_with_its_tokenizer_and_answers_the_same(checkpoint):
    model, tokenizer = fbk.load_checkpoint(checkpoint)
    original = fbk.from_pretrained(checkpoint)
    batch = tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch, speed=0.5).logits, original(**batch, speed=0.5).logits)


def test_students_fingerprint_covers_only_the_weight_files(checkpoint):
    """A Trainer leaves training_args.bin (and optimizer files) beside the weights: not a reason to
    refuse; other weights saved over the model's are."""
    (checkpoint / "training_args.bin").write_bytes(os.urandom(64))
    (checkpoint / "optimizer.pt").write_bytes(os.urandom(64))
    fbk.from_pretrained(checkpoint)
    tiny_model("bert").save_pretrained(checkpoint)  # another model's weights, the FastBERT files left
    with pytest.raises(ValueError, match=r"\(model\.safetensors\) are not the ones its FastBERT students"):
        fbk.from_pretrained(checkpoint)


# ---- students that were never distilled ------------------------------------------------------


def test_untrained_students_warn_at_speed_above_zero_and_distill_clears_it(tmp_path):
    model = fbk.patch(tiny_model("bert")).eval()
    batch = random_batch(3, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch, speed=0.0)  # speed 0 runs no student: nothing to warn about
    with pytest.warns(UntrainedStudentsWarning, match="never distilled"):
        model(**batch, speed=0.5)
    fbk.distill(model, ["w1 w2", "w3 w4 w5"], word_tokenizer(), epochs=1, batch_size=2, progress=False)
    assert fbk.fastbert_config(model).students_trained
    fbk.save_pretrained(model, tmp_path / "d", tokenizer=word_tokenizer())
    loaded, _ = fbk.load_checkpoint(tmp_path / "d")
    assert fbk.fastbert_config(loaded).students_trained
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded(**batch, speed=0.5)


def test_classify_and_serve_refuse_untrained_students(tmp_path, capsys):
    """`classify --speed 0.5` on a plain Hugging Face checkpoint would let random students choose."""
    plain = tmp_path / "plain"
    tiny_model("bert").save_pretrained(plain)
    word_tokenizer().save_pretrained(plain)
    (tmp_path / "corpus.txt").write_text("w1 w2\nw3\n")
    args = ["classify", str(plain), str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "o.jsonl")]
    code = cli([*args, "--speed", "0.5"])
    assert code == 1 and "never distilled" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    assert cli(args) == 0
    model, tokenizer = fbk.load_checkpoint(plain)
    with Engine(model, tokenizer, require_trained_students=True) as engine:
        with pytest.raises(ValueError, match="never distilled"):
            engine.submit("w1 w2", speed=0.5).result(timeout=60)
        assert engine.submit("w1 w2", speed=0.0).result(timeout=60).exit_layer == 4


# ---- corpus files --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.text(alphabet=st.sampled_from(["a", "b", " ", "é", "\t", *SEPARATORS]), max_size=8), max_size=12)
)
def test_txt_corpus_is_one_text_per_newline(tmp_path, lines):
    """Any text, every Unicode line separator inside it: one text per \\n-separated line, in order."""
    path = tmp_path / "corpus.txt"
    path.write_bytes("".join(line + "\n" for line in lines).encode("utf-8"))
    expected = [line[:-1] if line.endswith("\r") else line for line in lines]  # CRLF files read as LF
    assert corpus.read_texts(path) == expected


def test_classified_corpus_has_one_row_per_line_whatever_the_separators(tmp_path):
    texts = [f"w1{sep}w2 w{i}" for i, sep in enumerate(SEPARATORS)] + ["w3"]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n", encoding="utf-8", newline="")
    out = fbk.classify_corpus(
        _trained_model(), tmp_path / "c.txt", word_tokenizer(), tmp_path / "o.jsonl", speed=0.5, progress=False
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(len(texts)))


@pytest.mark.parametrize("name", ["corpus.tsv", "corpus.json", "corpus", "corpus.xlsx"])
def test_unknown_corpus_formats_are_refused_by_name(tmp_path, name):
    (tmp_path / name).write_text("w1\n")
    with pytest.raises(corpus.CorpusFormatError, match=r"unknown corpus format.*known: \.txt, \.jsonl, \.csv, \.parq"):
        corpus.read_texts(tmp_path / name)


def test_corpus_suffixes_are_case_insensitive_and_csv_needs_no_pandas(tmp_path, monkeypatch):
    (tmp_path / "c.JSONL").write_text('{"text": "w1"}\n\n{"text": "w2", "id": 3}\n')
    assert corpus.read_texts(tmp_path / "c.JSONL") == ["w1", "w2"]
    monkeypatch.setitem(sys.modules, "pandas", None)  # importing pandas now fails
    (tmp_path / "c.CSV").write_text('id,text\n1,"w1, w2"\n2,"multi\nline"\n')
    assert corpus.read_texts(tmp_path / "c.CSV") == ["w1, w2", "multi\nline"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("c.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', r"line 2: a JSON Lines corpus needs an object with a 'text'"),
        ("c.jsonl", b'{"text": "a"}\n{"text": 3}\n', r"line 2: 'text' must be a string"),
        ("c.jsonl", b'{"text": "a"}\n{bad\n', r"line 2: not valid JSON"),
        ("c.txt", b"fine\nbad \xff byte\n", r"line 2: not valid UTF-8"),
        ("c.jsonl", b'{"text": "a"}\n{"text": "\xc3"}\n', r"line 2: not valid UTF-8"),
        ("c.csv", b"id,label\n1,2\n", r"no 'text' column"),
    ],
)
def test_malformed_corpus_files_name_the_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(corpus.CorpusFormatError, match=message):
        corpus.read_texts(tmp_path / name)


def test_bytes_are_not_a_corpus():
    with pytest.raises(TypeError, match="got bytes"):
        corpus.read_texts(b"w1\nw2")


# ---- corpus jobs: resume, outputs, concurrency -------------------------------------------------


def _interrupted_job(model, source: Path, output: Path, monkeypatch) -> None:
    """A job that dies after its first shard, as a killed one would, leaving its shard folder."""
    real = corpus._classify_shard
    calls = []

    def dying(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(corpus, "_classify_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        fbk.classify_corpus(model, source, word_tokenizer(), output, speed=0.5, shard_size=2, progress=False)
    monkeypatch.setattr(corpus, "_classify_shard", real)
    assert len(list(output.with_name(output.name + ".shards").glob("shard-*.jsonl"))) == 1


@pytest.mark.parametrize("change", ["model", "exit rule", "tokenizer"])
def test_resume_with_another_model_rule_or_tokenizer_is_refused(tmp_path, monkeypatch, change):
    source, output = tmp_path / "c.txt", tmp_path / "o.jsonl"
    source.write_text("".join(f"w{i} w{i + 1}\n" for i in range(7)))
    model = _trained_model()
    _interrupted_job(model, source, output, monkeypatch)
    tokenizer = word_tokenizer()
    if change == "model":
        model = _trained_model()
    elif change == "exit rule":
        fbk.fastbert_config(model).exit_rule = fbk.ExitRule("margin")
    else:
        tokenizer.add_tokens(["w9999"])
    with pytest.raises(ValueError, match="holds shards of another job"):
        fbk.classify_corpus(model, source, tokenizer, output, speed=0.5, shard_size=2, progress=False)
    assert not output.exists()


def test_resume_of_the_same_job_gives_the_uninterrupted_output(tmp_path, monkeypatch):
    source = tmp_path / "c.txt"
    source.write_text("".join(f"w{i} w{i + 1}\n" for i in range(7)))
    model = _trained_model()
    whole = fbk.classify_corpus(model, source, word_tokenizer(), tmp_path / "a.jsonl", speed=0.5, shard_size=2)
    _interrupted_job(model, source, tmp_path / "b.jsonl", monkeypatch)
    resumed = fbk.classify_corpus(model, source, word_tokenizer(), tmp_path / "b.jsonl", speed=0.5, shard_size=2)
    assert resumed.read_bytes() == whole.read_bytes()


def test_output_that_is_the_input_is_refused(tmp_path):
    source = tmp_path / "c.txt"
    source.write_text("w1\nw2\n")
    with pytest.raises(ValueError, match="is the corpus itself"):
        fbk.classify_corpus(_trained_model(), source, word_tokenizer(), tmp_path / "." / "c.txt", speed=0.5)
    assert source.read_text() == "w1\nw2\n"


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    source, output = tmp_path / "c.txt", tmp_path / "o.jsonl"
    source.write_text("w1\nw2\n")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "o.jsonl.lock").write_text(str(other.pid))  # a live job holds the output
        with pytest.raises(RuntimeError, match=f"another job \\(pid {other.pid}\\) is writing"):
            fbk.classify_corpus(_trained_model(), source, word_tokenizer(), output, speed=0.5, progress=False)
    finally:
        other.kill()
        other.wait()
    # Its process gone (killed), the lock is stale: the next job takes it over and finishes.
    fbk.classify_corpus(_trained_model(), source, word_tokenizer(), output, speed=0.5, progress=False)
    assert len(output.read_text().splitlines()) == 2 and not (tmp_path / "o.jsonl.lock").exists()


# ---- calibration labels ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels,error,message",
    [
        (lambda n: torch.full((n,), 7), ValueError, r"not classes of \[0, 3\); the first is labels\[0\] = 7"),
        (lambda n: torch.full((n,), -100), ValueError, r"= -100"),
        (lambda n: torch.zeros(n, 1, dtype=torch.long), ValueError, r"shape \[N\] = \["),
        (lambda n: torch.zeros(n - 1, dtype=torch.long), ValueError, r"shape \[N\]"),
        (lambda n: torch.zeros(n), TypeError, "integer class ids"),
    ],
)
def test_calibration_refuses_labels_that_cannot_be_right(labels, error, message):
    model = _trained_model()
    batch = random_batch(12, 9)
    profile = exit_profile(model, [batch])
    before = fbk.fastbert_config(model).exit_rule
    with pytest.raises(error, match=message):
        fbk.calibrate(model, profile, labels=labels(12), max_accuracy_drop=0.1)
    assert fbk.fastbert_config(model).exit_rule == before  # nothing written into the config


# ---- the engine's futures and arguments ------------------------------------------------------


def test_wait_on_a_cancelled_future_returns():
    model = _trained_model()
    release, started = threading.Event(), threading.Event()
    with Engine(model, max_batch=1) as engine, layers_wait_for(model, release, started):
        blocker = engine.submit([5, 6], speed=0.0)
        assert started.wait(timeout=30)
        queued = engine.submit([7, 8], speed=0.0)
        assert queued.cancel()
        release.set()
        _, not_done = concurrent.futures.wait([queued, blocker], timeout=30)
        assert not not_done and queued.cancelled()


@pytest.mark.parametrize("kwargs,error", [({"timeout": "1"}, TypeError), ({"timeout": -1}, ValueError),
                                          ({"wait": "x"}, TypeError), ({"block": "no"}, TypeError)])  # fmt: skip
def test_bad_submit_arguments_take_no_slot(kwargs, error):
    with Engine(_trained_model(), max_in_flight=2) as engine:
        for _ in range(5):
            with pytest.raises(error):
                engine.submit([5, 6], speed=0.0, **kwargs)
        assert engine.submit([5, 6], speed=0.0, block=False).result(timeout=60).exit_layer == 4


@pytest.mark.parametrize("request_", [b"hi", bytearray(b"hi"), [True, False], [5, 6.0]])
def test_bytes_bools_and_floats_are_not_token_ids(request_):
    with (
        Engine(_trained_model()) as engine,
        pytest.raises(TypeError, match=r"a request is a text, a \(text, text_pair\) tuple or a sequence"),
    ):
        engine.submit(request_, speed=0.0).result(timeout=60)


def test_aclassify_never_blocks_the_event_loop():
    """With the engine full, aclassify waits for a slot in a thread: the loop keeps running."""
    model = _trained_model()
    release = threading.Event()
    with Engine(model, max_in_flight=1) as engine, layers_wait_for(model, release):
        first = engine.submit([5, 6], speed=0.0)

        async def scenario():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)

            tick_task = asyncio.ensure_future(ticker())
            answer = asyncio.ensure_future(engine.aclassify([7, 8], speed=0.0))
            await asyncio.sleep(0.3)  # the engine is full all this time
            seen = ticks
            release.set()
            result = await asyncio.wait_for(answer, timeout=60)
            tick_task.cancel()
            return seen, result

        seen, result = asyncio.run(scenario())
        assert seen >= 10 and result.exit_layer == 4
        first.result(timeout=60)


def test_a_base_exception_in_a_layer_fails_every_pending_request_and_marks_the_engine_unhealthy():
    model = _trained_model()
    layer_class = type(model.bert.encoder.layer[0])
    original = layer_class.forward

    def dying(self, *args, **kwargs):
        raise SystemExit("a layer called sys.exit")

    layer_class.forward = dying
    try:
        engine = Engine(model, max_batch=2)
        futures = [engine.submit([5 + i, 6], speed=0.0) for i in range(5)]
        for future in futures:
            with pytest.raises(EngineClosedError, match="worker stopped"):
                future.result(timeout=60)
        assert not engine.healthy and isinstance(engine.failure, SystemExit)
        with pytest.raises(EngineClosedError, match="stopped after an error"):
            engine.submit([5, 6], speed=0.0)
        engine.close()
    finally:
        layer_class.forward = original


def test_untrained_engine_warns_at_speed_above_zero():
    with Engine(fbk.patch(tiny_model("bert")).eval()) as engine, pytest.warns(UntrainedStudentsWarning):
        engine.submit([5, 6], speed=0.5).result(timeout=60)


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["classify", "{tmp}/missing", "{tmp}/c.txt", "--out", "{tmp}/o.jsonl"], "missing is not a directory"),
        (["classify", "{ckpt}", "{tmp}/absent.txt", "--out", "{tmp}/o.jsonl"], "absent.txt is not a file"),
        (["classify", "{ckpt}", "{tmp}/c.tsv", "--out", "{tmp}/o.jsonl"], "unknown corpus format '.tsv'"),
        (["serve", "{tmp}/missing"], "missing is not a directory"),
        (["distill", "{tmp}", "--texts", "{tmp}/c.txt", "--out", "{tmp}/d"], "not a Hugging Face checkpoint"),
    ],
)
def test_failures_are_one_line_with_exit_code_1(checkpoint, tmp_path, capsys, argv, message):
    (tmp_path / "c.txt").write_text("w1\n")
    (tmp_path / "c.tsv").write_text("w1\n")
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["classify", "c", "x.txt", "--out", "o", "--speed", "2"], "speed must be in [0, 1]"),
        (["classify", "c", "x.txt", "--out", "o", "--workers", "0"], "must be at least 1"),
        (["serve", "c", "--max-batch", "0"], "must be at least 1"),
        (["classify", "c", "x.txt", "--out", "o", "--batch-size", "many"], "'many' is not an integer"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_version_and_debug(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fastbert_kernels {fbk.__version__}"
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, with its traceback
        cli(["--debug", "serve", str(tmp_path / "missing")])


def test_module_entry_point_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fastbert_kernels", "classify", str(tmp_path / "nope"), "x.txt", "--out", "o"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


# ---- config files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("branch_size", "abc", "branch_size must be an int, got 'abc'"),
        ("branch_heads", 3, "branch_size (128) must be a positive multiple of branch_heads (3)"),
        ("teacher", "student", "teacher must be 'model' or 'branch'"),
        ("exit_rule", {"speed": 2}, "exit_rule: speed must be in [0, 1]"),
        ("exit_rule", {"criterion": "top1"}, "exit_rule: unknown exit criterion 'top1'"),
        ("exit_rule", {"students": [0, 1]}, "exit_rule: students are numbered from layer 1"),
        ("exit_rule", {"patience": 2, "sped": 1}, "exit_rule: unknown exit-rule keys ['sped']"),
        ("trim_sequence", "yes", "trim_sequence must be true or false"),
        ("sped", 0.5, "unknown keys ['sped']; known: "),
    ],
)
def test_config_errors_name_the_file_the_key_and_the_allowed_values(checkpoint, key, value, message):
    path = checkpoint / CONFIG_FILE
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as info:
        fbk.load_checkpoint(checkpoint)
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_version_1_config_loads_into_one_exit_rule(checkpoint):
    """Checkpoints saved before the exit rule was one value keep loading, with the same rule."""
    path = checkpoint / CONFIG_FILE
    data = json.loads(path.read_text())
    del data["exit_rule"]
    data.update(format_version=1, default_speed=0.3, exit_criterion="margin", exit_temperature=0.5, exit_patience=2)
    path.write_text(json.dumps(data))
    model, _ = fbk.load_checkpoint(checkpoint)
    assert fbk.fastbert_config(model).exit_rule == fbk.ExitRule("margin", 0.5, 2, speed=0.3)


def test_a_finished_job_leaves_only_its_output(tmp_path):
    """No lock, manifest or shard folder is left behind once the output is complete."""
    source = tmp_path / "c.txt"
    source.write_text("w1\n")
    fbk.classify_corpus(_trained_model(), source, word_tokenizer(), tmp_path / "o.jsonl", speed=0.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "o.jsonl"]
