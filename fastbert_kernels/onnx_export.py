"""The adaptive model on ONNX Runtime: one graph per layer and per student, the exits on the host.

Early exit has data-dependent shapes (the batch shrinks after each student), which one ONNX graph
cannot hold. :func:`export_onnx` therefore cuts a patched model into fixed-shape pieces:

* ``layer_1.onnx``: ``(input_ids, attention_mask[, token_type_ids]) -> next_hidden [B, S, H]``, the
  embeddings and the first layer;
* ``layer_<i>.onnx``, ``1 < i < L``: ``(hidden, attention_mask) -> next_hidden``;
* ``layer_<L>.onnx``: ``(hidden, attention_mask) -> logits [B, C]``, the last layer and the teacher;
* ``student_<i>.onnx``, ``i < L``: ``(hidden, attention_mask) -> logits [B, C]``, the branch after
  layer i (its differentiable forward, :func:`fastbert_kernels.ops.reference.branch_logits`);
* ``fastbert_onnx.json``: the manifest (layers, inputs, the model's exit rule, the labels).

Every graph has dynamic batch and sequence axes. :class:`OnnxFastBert` runs them with ONNX Runtime
under an :class:`~fastbert_kernels.ExitRule`: after each evaluated student it takes the exit
decision with the plain-torch reference (:func:`fastbert_kernels.ops.reference.exit_decision`, so
the criteria, temperatures and patience mean what they mean everywhere else), then keeps the rows
that go on and cuts the padding they no longer need, as the torch model's compaction does. Rows
come back in input order.

``int8=True`` quantises the layer graphs with ONNX Runtime's dynamic int8 quantisation (weights
int8 per output channel); the students stay float, as in :func:`fastbert_kernels.quantize`. An int8
graph answers differently from the float model, so calibrate what is served: build its profile
with :meth:`OnnxFastBert.exit_profile` (risks against the float model's answers) and pass it to
:func:`fastbert_kernels.calibrate`.

Needs the ``onnx`` extra (``onnx``, ``onnxruntime``, ``onnxscript``: ``torch.onnx.export`` with
``dynamo=True``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .architectures import Architecture, architecture_for
from .encoder import check_input_ids, check_input_shape, layer_context, normalize_attention_mask, raise_empty_rows
from .exit_rule import ExitRule
from .modeling import teacher_logits
from .ops.reference import exit_decision
from .profile import ExitProfile
from .state import branch_modules, fastbert_config

MANIFEST = "fastbert_onnx.json"
# Bumped when the graphs' inputs or outputs change, so that an old export is refused, not misread.
FORMAT_VERSION = 1


class _FirstLayer(nn.Module):
    """Embeddings and layer 1: ``(input_ids, attention_mask[, token_type_ids]) -> hidden``."""

    def __init__(self, model: nn.Module, arch: Architecture) -> None:
        super().__init__()
        self.model, self.arch = model, arch

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        model, arch = self.model, self.arch
        hidden = arch.embed(model, arch.base_model(model), input_ids, token_type_ids, None, None, attention_mask)
        # padded=True: the graph serves padded and unpadded batches alike, so it always builds the mask.
        context = layer_context(model, arch, hidden, attention_mask, True)
        return arch.run(model, 0, arch.layers(model)[0], hidden, context)


class _Layer(nn.Module):
    """Layer ``index + 1`` on hidden states; the last one also runs the teacher."""

    def __init__(self, model: nn.Module, arch: Architecture, index: int, last: bool) -> None:
        super().__init__()
        self.model, self.arch, self.index, self.last = model, arch, index, last

    def forward(self, hidden, attention_mask):
        model, arch = self.model, self.arch
        context = layer_context(model, arch, hidden, attention_mask, True)
        hidden = arch.run(model, self.index, arch.layers(model)[self.index], hidden, context)
        return teacher_logits(model, arch, hidden, attention_mask) if self.last else hidden


class _Student(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, hidden, attention_mask):
        return self.branch(hidden, attention_mask)


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], output: str, path: Path) -> None:
    dims = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for name in inputs}
    with warnings.catch_warnings():  # the exporter reports its passes as warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (), str(path), kwargs=inputs, input_names=list(inputs), output_names=[output],
            dynamic_shapes=dims, dynamo=True, verbose=False,
        )  # fmt: skip


def _onnx_quantization():
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as err:
        raise ImportError("ONNX export needs the onnx extra: pip install 'fastbert_kernels[onnx]'") from err
    return QuantType, quantize_dynamic


def export_onnx(model: nn.Module, folder: str | Path, int8: bool = False) -> Path:
    """Export the patched float ``model`` as the graphs of the module docstring into ``folder``
    (created); returns it. ``int8``: then quantise the layer graphs (:func:`quantize_onnx`)."""
    config = fastbert_config(model)  # raises unless patched
    if config.quantization is not None:
        raise ValueError("export the float model: export_onnx(..., int8=True) quantises the ONNX graphs itself")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("export from a CPU model: move it with model.to('cpu') first")
    _onnx_quantization()  # the extra is there, before minutes of export
    arch = architecture_for(model)
    num_layers = len(arch.layers(model))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    # Rows of different lengths, so that the traced graphs take the padded path.
    input_ids = torch.randint(1, model.config.vocab_size, (2, 6))  # any ids the embedding holds
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    first_inputs = {"input_ids": input_ids, "attention_mask": mask}
    if arch.token_types:
        first_inputs["token_type_ids"] = torch.zeros_like(input_ids)
    with torch.no_grad():
        first = _FirstLayer(model, arch)
        between = {"hidden": first(**first_inputs), "attention_mask": mask}
        _export(first, first_inputs, "next_hidden", folder / "layer_1.onnx")
        for index in range(1, num_layers):
            last = index == num_layers - 1
            layer = _Layer(model, arch, index, last)
            _export(layer, between, "logits" if last else "next_hidden", folder / f"layer_{index + 1}.onnx")
        for layer, branch in enumerate(branch_modules(model)[: num_layers - 1], start=1):
            _export(_Student(branch), between, "logits", folder / f"student_{layer}.onnx")
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "num_layers": num_layers,
        "num_labels": model.config.num_labels,
        "inputs": list(first_inputs),
        "max_length": arch.max_length(model.config),
        "int8": False,
        "exit_rule": config.exit_rule.as_dict(),
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return quantize_onnx(folder, folder) if int8 else folder


def quantize_onnx(source: str | Path, target: str | Path) -> Path:
    """The float export in ``source`` with its layer graphs quantised to int8 (ONNX Runtime's
    dynamic quantisation, int8 weights per output channel), written to ``target`` (may be
    ``source``: in place); the students stay float. Returns ``target``."""
    QuantType, quantize_dynamic = _onnx_quantization()
    source, target = Path(source), Path(target)
    manifest = _read_manifest(source)
    if manifest["int8"]:
        raise ValueError(f"{source} is already int8: quantise the float export")
    target.mkdir(parents=True, exist_ok=True)
    for layer in range(1, manifest["num_layers"] + 1):
        name = f"layer_{layer}.onnx"
        staged = target / f"layer_{layer}.int8.onnx"
        with _quiet_root_logger():  # ORT advises shape pre-processing on every call; dynamic int8 needs none
            quantize_dynamic(str(source / name), str(staged), weight_type=QuantType.QInt8, per_channel=True)
        staged.replace(target / name)
        # The float graph kept its weights beside it; the int8 graph holds its own.
        (target / f"{name}.data").unlink(missing_ok=True)
    if target != source:
        for layer in range(1, manifest["num_layers"]):
            for suffix in (".onnx", ".onnx.data"):
                name = f"student_{layer}{suffix}"
                if (source / name).is_file():
                    shutil.copyfile(source / name, target / name)
    (target / MANIFEST).write_text(json.dumps({**manifest, "int8": True}, indent=1) + "\n")
    return target


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST}: export it with fastbert_kernels.export_onnx")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder} was exported in format {manifest.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}: export it again"
        )
    return manifest


class OnnxFastBert:
    """The exported graphs under an exit rule, on ONNX Runtime's CPU provider.

    ``OnnxFastBert(folder, threads=1)(input_ids, attention_mask)`` -> ``(logits [B, C] float32,
    exit_layer [B] int64)``, both torch tensors, rows in input order. ``rule`` defaults to the
    exported model's exit rule; ``speed`` replaces its speed for one call.
    """

    def __init__(self, folder: str | Path, threads: int | None = None, rule: ExitRule | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError("OnnxFastBert needs the onnx extra: pip install 'fastbert_kernels[onnx]'") from err
        folder = Path(folder)
        manifest = _read_manifest(folder)
        self.num_layers: int = manifest["num_layers"]
        self.num_labels: int = manifest["num_labels"]
        self.input_names: list[str] = manifest["inputs"]
        self.max_length: int = manifest["max_length"]
        self.int8: bool = manifest["int8"]
        self.rule = ExitRule.from_dict(manifest["exit_rule"]) if rule is None else rule
        self.rule.check_for(self.num_layers)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle workers spin by default, taking the cores from whatever runs between two calls
        # (here: the host's exit decision and compaction).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        def session(name: str):
            path = str(folder / f"{name}.onnx")
            return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        self._layers = [session(f"layer_{i}") for i in range(1, self.num_layers + 1)]
        self._students = {i: session(f"student_{i}") for i in range(1, self.num_layers)}

    def with_rule(self, rule: ExitRule) -> OnnxFastBert:
        """The same sessions under another rule (no graph is loaded again)."""
        rule.check_for(self.num_layers)
        other = copy.copy(self)
        other.rule = rule
        return other

    def _first(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._layers[0].run(None, {name: feeds[name] for name in self.input_names})[0]

    def _feeds(self, batch: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The graphs' inputs, checked as the torch model checks them."""
        input_ids = batch["input_ids"]
        check_input_ids(input_ids)
        check_input_shape(input_ids.shape, self.max_length)
        mask = normalize_attention_mask(batch.get("attention_mask"), input_ids.shape, input_ids.device)
        if not bool(mask.any(dim=1).all()):
            raise_empty_rows(mask)
        feeds = {"input_ids": input_ids.to(torch.int64).cpu().numpy(), "attention_mask": mask.cpu().numpy()}
        if "token_type_ids" in self.input_names:
            types = batch.get("token_type_ids")
            types = torch.zeros_like(input_ids) if types is None else types
            feeds["token_type_ids"] = types.to(torch.int64).cpu().numpy()
        return feeds

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        speed: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rule = self.rule if speed is None else self.rule.replace(speed=speed)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feeds = self._feeds(batch)
        n = input_ids.shape[0]
        logits_out = np.zeros((n, self.num_labels), dtype=np.float32)
        exit_layer = np.full(n, self.num_layers, dtype=np.int64)
        rows = np.arange(n)
        mask = feeds["attention_mask"]
        hidden = self._first(feeds)
        streak = None
        for layer in range(1, self.num_layers):
            if rule.speed > 0 and rule.evaluates(layer):
                student = self._students[layer].run(None, {"hidden": hidden, "attention_mask": mask})[0]
                logits = torch.from_numpy(student)
                decision = exit_decision(logits, rule.speed, rule.criterion, rule.temperature, rule.patience, streak)
                exits = decision.exits.numpy()
                if exits.any():
                    logits_out[rows[exits]] = logits.numpy()[exits]
                    exit_layer[rows[exits]] = layer
                    keep = ~exits
                    rows, hidden, mask = rows[keep], hidden[keep], mask[keep]
                    if rows.size == 0:
                        break
                    # The padding no kept row needs goes, as in the torch model's compaction.
                    length = int(np.flatnonzero(mask.any(axis=0)).max()) + 1
                    hidden, mask = np.ascontiguousarray(hidden[:, :length]), np.ascontiguousarray(mask[:, :length])
                    streak = decision.streak[torch.from_numpy(keep)] if rule.patience > 1 else None
                elif rule.patience > 1:
                    streak = decision.streak
            output = self._layers[layer].run(None, {"hidden": hidden, "attention_mask": mask})[0]
            if layer == self.num_layers - 1:
                logits_out[rows] = output
            else:
                hidden = output
        return torch.from_numpy(logits_out), torch.from_numpy(exit_layer)

    def exit_profile(self, batches: Sequence[Mapping[str, torch.Tensor]], reference: nn.Module | None = None):
        """The :class:`~fastbert_kernels.profile.ExitProfile` of these graphs on ``batches`` (every
        student and the teacher, no exit), for :func:`fastbert_kernels.calibrate`. ``reference``:
        the float torch model whose full-depth answers the risks are measured against (for an int8
        export; default: the graphs' own teacher)."""
        profiles = []
        for batch in batches:
            feeds = self._feeds(batch)
            mask = feeds["attention_mask"]
            hidden, columns = self._first(feeds), []
            for layer in range(1, self.num_layers):
                columns.append(self._students[layer].run(None, {"hidden": hidden, "attention_mask": mask})[0])
                hidden = self._layers[layer].run(None, {"hidden": hidden, "attention_mask": mask})[0]
            columns.append(hidden)  # the last layer's graph returns the teacher's logits
            logits = torch.from_numpy(np.stack(columns, axis=1))
            lengths = torch.from_numpy(mask.sum(axis=1))
            profile = ExitProfile.from_logits(logits, lengths, torch.full_like(lengths, mask.shape[1]))
            if reference is not None:
                with torch.no_grad():
                    profile.reference = reference(**batch, speed=0.0).logits.argmax(-1)
            profiles.append(profile)
        return ExitProfile.concat(profiles)
