"""The checkpoint a benchmark runs: a given one, or the demo's distilled MiniLM on a data set from
its cache (``make demo`` writes Rotten Tomatoes', ``... demo --data banking77`` BANKING77's)."""

from __future__ import annotations

from pathlib import Path

import fastbert_kernels as fbk

DEMO_CACHE = Path(".cache/fastbert_demo")


def load_checkpoint(path: str | None, data: str = "rotten_tomatoes"):
    """``(model, tokenizer, checkpoint)``, or None when no path is given and the demo has not run
    on ``data``."""
    if path is not None:
        checkpoint = Path(path)
    else:
        candidates = DEMO_CACHE.glob(f"{data}-fastbert-*")
        found = sorted(p for p in candidates if (p / "fastbert_config.json").is_file())
        if not found:
            return None
        checkpoint = found[-1]
    model, tokenizer = fbk.load_checkpoint(checkpoint)
    return model, tokenizer, checkpoint


def require_checkpoint(path: str | None, data: str = "rotten_tomatoes"):
    """:func:`load_checkpoint`, or exit with a message (status 1) when there is none."""
    loaded = load_checkpoint(path, data)
    if loaded is None:
        raise SystemExit(f"no checkpoint: run the demo on {data} first (make demo) or pass --checkpoint")
    return loaded
