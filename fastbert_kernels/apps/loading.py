"""Loading a checkpoint for the commands that take one (distill, classify, serve)."""

from __future__ import annotations

from pathlib import Path


def load_for_cli(checkpoint: str):
    """A patched model and its tokenizer from a FastBERT checkpoint, or a plain fine-tuned
    classifier checkpoint (patched here, with fresh students)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import fastbert_kernels as fbk

    from ..config import CONFIG_FILE

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    if (Path(checkpoint) / CONFIG_FILE).is_file():
        return fbk.from_pretrained(checkpoint), tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, local_files_only=True)
    return fbk.patch(model), tokenizer
