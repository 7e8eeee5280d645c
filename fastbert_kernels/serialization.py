"""Loading a patched model saved with ``model.save_pretrained`` (format: :mod:`.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .checkpoint import FINGERPRINT_KEY, weights_fingerprint
from .config import BRANCHES_FILE, FastBertConfig
from .modeling import patch
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
        raise ValueError(
            f"the model weights in {directory} are not the ones its FastBERT students were distilled "
            "from (another model was saved over it?); patch and distil this model again, or load the "
            "plain model with AutoModelForSequenceClassification"
        )


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
