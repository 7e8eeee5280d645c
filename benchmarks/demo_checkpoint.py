"""The checkpoint the serving and batch-1 benchmarks run: a given one, or the demo's distilled
MiniLM on Rotten Tomatoes from its cache (``make demo`` writes it)."""

from __future__ import annotations

from pathlib import Path

import fastbert_kernels as fbk

DEMO_CACHE = Path(".cache/fastbert_demo")


def load_checkpoint(path: str | None):
    """``(model, tokenizer, checkpoint)``, or None when no path is given and the demo has not run."""
    if path is not None:
        checkpoint = Path(path)
    else:
        candidates = DEMO_CACHE.glob("rotten_tomatoes-fastbert-*")
        found = sorted(p for p in candidates if (p / "fastbert_config.json").is_file())
        if not found:
            return None
        checkpoint = found[-1]
    model, tokenizer = fbk.load_checkpoint(checkpoint)
    return model, tokenizer, checkpoint


def require_checkpoint(path: str | None):
    """:func:`load_checkpoint`, or exit with a message (status 1) when there is none."""
    loaded = load_checkpoint(path)
    if loaded is None:
        raise SystemExit("no checkpoint: run `make demo` first or pass --checkpoint")
    return loaded
