"""Loading a patched model saved with ``model.save_pretrained`` (format: :mod:`.checkpoint`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .checkpoint import FINGERPRINT_KEY, TOKENIZER_FILES, model_weight_files, weights_fingerprint
from .config import BRANCHES_FILE, CONFIG_FILE, FastBertConfig
from .modeling import patch
from .quantization import quantize
from .state import branch_modules


def load_branches(model: nn.Module, directory: str | Path) -> None:
    """Loads ``fastbert_branches.safetensors`` into a patched model (``load_state_dict(strict=True)``:
    every key and shape must match) and checks that the base weights are the students' teacher."""
    path = Path(directory) / BRANCHES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has a FastBERT config but no {BRANCHES_FILE}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            saved_fingerprint = (handle.metadata() or {}).get(FINGERPRINT_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupted or not a safetensors file: {err}") from err
    try:
        branch_modules(model).load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(
            f"{path} does not match this model's branches (a checkpoint saved from a model with another "
            f"depth, width, class count or teacher mode?): {shown}"
        ) from err
    if saved_fingerprint is not None and saved_fingerprint != weights_fingerprint(Path(directory)):
        files = ", ".join(p.name for p in model_weight_files(Path(directory))) or "none"
        raise ValueError(
            f"the model weights in {directory} ({files}) are not the ones its FastBERT students were "
            "saved with (another model was saved over them?); patch and distil this model again, or "
            "load the plain model with AutoModelForSequenceClassification"
        )


def from_pretrained(directory: str | Path, **kwargs) -> nn.Module:
    """Loads a patched model saved with ``model.save_pretrained``; outputs are identical. A
    checkpoint whose config says ``quantization: "int8"`` is loaded in float and quantised again
    (:func:`fastbert_kernels.quantize`, deterministic): the int8 model that was calibrated.

    Keyword arguments go to ``AutoModelForSequenceClassification.from_pretrained`` (e.g.
    ``attn_implementation``, ``dtype``). Loading is local: nothing is downloaded.
    """
    from transformers import AutoModelForSequenceClassification

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    config = FastBertConfig.load(directory)
    kwargs.setdefault("local_files_only", True)
    model = AutoModelForSequenceClassification.from_pretrained(str(directory), **kwargs)
    patch(model, dataclasses.replace(config, quantization=None))
    load_branches(model, directory)
    model.eval()
    if config.quantization is not None:
        model = quantize(model, config.quantization)
    return model


def load_tokenizer(directory: str | Path, model: nn.Module):
    """The tokenizer saved in ``directory``, checked against ``model``: every id it can produce is
    a row of the embedding (its size is at most ``vocab_size`` and not far below it), and its pad
    token is the model's. Without tokenizer files a ``FileNotFoundError`` says how to save one
    (transformers would otherwise build a placeholder whose every word is the same id)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{directory} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); save it beside the model: "
            "fastbert_kernels.save_pretrained(model, directory, tokenizer=tokenizer), or "
            "tokenizer.save_pretrained(directory)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    vocab_size = getattr(model.config, "vocab_size", None)
    size = len(tokenizer)
    # Embeddings are often padded past the vocabulary (to a multiple of 8 or 64), never below it.
    if vocab_size is not None and not (0.9 * vocab_size <= size <= vocab_size):
        raise ValueError(
            f"the tokenizer in {directory} has {size} tokens but the model's embedding has "
            f"{vocab_size} rows: they do not belong together (save the model's own tokenizer there)"
        )
    model_pad = getattr(model.config, "pad_token_id", None)
    if model_pad is not None and tokenizer.pad_token_id is not None and tokenizer.pad_token_id != model_pad:
        raise ValueError(
            f"the tokenizer in {directory} pads with id {tokenizer.pad_token_id} but the model's "
            f"pad_token_id is {model_pad}: they do not belong together"
        )
    return tokenizer


def load_checkpoint(directory: str | Path, **kwargs) -> tuple[nn.Module, object]:
    """A patched model and its checked tokenizer from ``directory``: a FastBERT checkpoint, or a
    plain fine-tuned ``...ForSequenceClassification`` one (patched here; its fresh students are
    untrained, so it runs at speed 0 until distilled). Keyword arguments go to ``from_pretrained``."""
    from transformers import AutoModelForSequenceClassification

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {directory} is not a directory")
    if (directory / CONFIG_FILE).is_file():
        model = from_pretrained(directory, **kwargs)
    else:
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint (no config.json)")
        kwargs.setdefault("local_files_only", True)
        model = patch(AutoModelForSequenceClassification.from_pretrained(str(directory), **kwargs))
    return model, load_tokenizer(directory, model)
