"""Save and load patched models in Hugging Face's own format.

A checkpoint directory is an ordinary Hugging Face checkpoint (a plain
``AutoModelForSequenceClassification.from_pretrained`` still loads it, without the branches) plus
``fastbert_config.json`` and ``fastbert_branches.safetensors``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import BRANCHES_FILE, FastBertConfig
from .modeling import BRANCHES_ATTR, branches, fastbert_config, patch

# Where the branches file records the base weights it belongs to (see weights_fingerprint).
FINGERPRINT_KEY = "teacher_weights_sha256"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def save_pretrained_with_branches(self: nn.Module, save_directory: str | Path, **kwargs) -> None:
    """``model.save_pretrained`` of a patched model: the base checkpoint, then the branches."""
    state_dict = kwargs.pop("state_dict", None)
    state_dict = self.state_dict() if state_dict is None else state_dict
    prefix = BRANCHES_ATTR + "."
    base_state = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    type(self).save_pretrained(self, save_directory, state_dict=base_state, **kwargs)
    directory = Path(save_directory)
    fastbert_config(self).save(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in branches(self).state_dict().items()}
    metadata = {
        "format": "pt",
        "num_branches": str(len(branches(self))),
        FINGERPRINT_KEY: weights_fingerprint(directory),
    }
    save_file(tensors, str(directory / BRANCHES_FILE), metadata=metadata)


def weights_fingerprint(directory: Path) -> str:
    """SHA-256 over the base model's weight files in ``directory`` (names and bytes, in name order).

    The students are only valid for the teacher they were distilled from. A file fingerprint does
    not depend on the dtype a model is later loaded in, and it changes when another model's
    ``save_pretrained`` overwrites the weights and leaves the FastBERT files behind."""
    digest = hashlib.sha256()
    files = sorted(
        p for p in directory.iterdir() if p.name != BRANCHES_FILE and p.suffix in WEIGHT_SUFFIXES and p.is_file()
    )
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_branches(model: nn.Module, directory: str | Path) -> None:
    """Loads ``fastbert_branches.safetensors`` into a patched model; every key and shape must match."""
    path = Path(directory) / BRANCHES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has a FastBERT config but no {BRANCHES_FILE}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            saved_fingerprint = (handle.metadata() or {}).get(FINGERPRINT_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupted or not a safetensors file: {err}") from err
    target = branches(model).state_dict()
    missing = sorted(set(target) - set(tensors))
    unexpected = sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model's branches: missing {missing[:6]}, unexpected {unexpected[:6]} "
            "(a checkpoint saved from a model with another depth, class count or teacher mode?)"
        )
    wrong = [
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if tensors[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{path} has branch tensors of the wrong shape: {wrong[:6]}")
    if saved_fingerprint is not None and saved_fingerprint != weights_fingerprint(Path(directory)):
        raise ValueError(
            f"the model weights in {directory} are not the ones its FastBERT students were distilled "
            "from (another model was saved over it?); patch and distil this model again, or load the "
            "plain model with AutoModelForSequenceClassification"
        )
    with torch.no_grad():
        for key, value in target.items():
            value.copy_(tensors[key])


def from_pretrained(directory: str | Path, **kwargs) -> nn.Module:
    """Loads a patched model saved with ``model.save_pretrained``; outputs are identical.

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
    patch(model, config)
    load_branches(model, directory)
    model.eval()
    return model
