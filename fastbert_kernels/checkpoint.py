"""Saving a patched model in Hugging Face's own format (loading: :mod:`.serialization`).

A checkpoint directory is an ordinary Hugging Face checkpoint (a plain
``AutoModelForSequenceClassification.from_pretrained`` still loads it, without the branches) plus
``fastbert_config.json`` and ``fastbert_branches.safetensors``, whose metadata records which base
weights the students were distilled from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .config import BRANCHES_FILE
from .quantization import float_source
from .state import BRANCHES_ATTR, branch_modules, fastbert_config

# Where the branches file records the base weights it belongs to (see weights_fingerprint).
FINGERPRINT_KEY = "teacher_weights_sha256"
# The files Hugging Face's from_pretrained loads weights from, in the order it prefers them: a
# sharded checkpoint's index names its shards. Nothing else in the directory counts (a Trainer's
# training_args.bin, optimizer.pt, rng_state.pth do not).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Files a saved tokenizer leaves; a directory with none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def save_pretrained_with_branches(self: nn.Module, save_directory: str | Path, **kwargs) -> None:
    """``model.save_pretrained`` of a patched model: the base checkpoint, then the branches. An
    int8 model (:func:`fastbert_kernels.quantize`) saves its float model's base weights, with its
    own branches and config (which says ``quantization: "int8"``, so loading quantises again)."""
    source = float_source(self)
    base = self if source is None else source
    state_dict = kwargs.pop("state_dict", None)
    if state_dict is not None and base is not self:
        raise ValueError("an int8 model saves its float model's weights: pass no state_dict")
    state_dict = base.state_dict() if state_dict is None else state_dict
    prefix = BRANCHES_ATTR + "."
    base_state = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    type(base).save_pretrained(base, save_directory, state_dict=base_state, **kwargs)
    directory = Path(save_directory)
    fastbert_config(self).save(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in branch_modules(self).state_dict().items()}
    metadata = {
        "format": "pt",
        "num_branches": str(len(branch_modules(self))),
        FINGERPRINT_KEY: weights_fingerprint(directory),
    }
    save_file(tensors, str(directory / BRANCHES_FILE), metadata=metadata)


def save_pretrained(model: nn.Module, directory: str | Path, tokenizer=None, **kwargs) -> Path:
    """Saves a patched model and its tokenizer into ``directory``: what the command line, the
    server and :func:`fastbert_kernels.load_checkpoint` need (a checkpoint without its tokenizer is
    refused there, since transformers would otherwise make up a placeholder one)."""
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer: save_pretrained(model, directory, tokenizer=tokenizer)")
    directory = Path(directory)
    model.save_pretrained(directory, **kwargs)
    tokenizer.save_pretrained(directory)
    return directory


def model_weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads in ``directory``: ``model.safetensors`` (or the
    shards its index names), else ``pytorch_model.bin`` (or its shards); [] if there are none."""
    for name in WEIGHT_FILES:
        index = directory / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            return [directory / shard for shard in shards]
        if (directory / name).is_file():
            return [directory / name]
    return []


def weights_fingerprint(directory: Path) -> str:
    """SHA-256 over the base model's weight files in ``directory`` (names and bytes, in name order).

    The students are only valid for the teacher they were distilled from. A file fingerprint does
    not depend on the dtype a model is later loaded in, and it changes when another model's
    ``save_pretrained`` overwrites the weights and leaves the FastBERT files behind."""
    digest = hashlib.sha256()
    for path in model_weight_files(directory):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
