"""Run by tests/test_distributed.py under torchrun: distils a checkpoint's students through the
public API and writes, per rank, the students and a digest of everything that must stay frozen."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

import fastbert_kernels as fbk
from fastbert_kernels import distributed
from fastbert_kernels.state import BRANCHES_ATTR


def main(checkpoint: str, texts_file: str, out: str, resume: str | None = None, max_steps: int | None = None) -> None:
    torch.set_num_threads(1)
    model = fbk.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    texts = Path(texts_file).read_text().splitlines()
    history = fbk.distill(
        model, texts, tokenizer, epochs=2, batch_size=8, lr=1e-3, seed=3, progress=False,
        checkpoint_dir=resume, checkpoint_every=2, max_steps=max_steps,
    )  # fmt: skip
    rank = distributed.context().rank
    frozen = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(BRANCHES_ATTR):
            frozen.update(name.encode() + tensor.numpy().tobytes())
    students = {}
    for i, student in enumerate(fbk.students(model)):
        students.update({f"{i}.{k}": v.contiguous() for k, v in student.state_dict().items()})
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(students, str(Path(out) / f"students-{rank}.safetensors"))
    (Path(out) / f"frozen-{rank}.txt").write_text(frozen.hexdigest())
    (Path(out) / f"loss-{rank}.txt").write_text(" ".join(f"{x:.8f}" for x in history.loss))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], args[1], args[2], args[3] if len(args) > 3 and args[3] != "-" else None,
         int(args[4]) if len(args) > 4 else None)  # fmt: skip
