"""Walking a Hugging Face encoder layer by layer: input checks, embeddings, masks, one layer.

Shared by the adaptive forward, training, evaluation and the benchmarks, so that every path
builds inputs and masks the same way the unpatched model does.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .architectures import Architecture
from .ops.sync_counter import host_read


@dataclasses.dataclass
class EncoderInputs:
    """Embedded inputs ready for layer 1: hidden ``[B, S, H]`` and mask ``[B, S]`` int64 (1 = token);
    padded: whether any token is masked (None when unknown, under torch.compile)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    padded: bool | None = None


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def normalize_attention_mask(
    attention_mask: torch.Tensor | None, shape: torch.Size, device: torch.device
) -> torch.Tensor:
    """0/1 int64 ``[B, S]`` mask from whatever the user passed (None means every token is real)."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.int64, device=device)
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs are {tuple(shape)}")
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be integer, bool or float, got {attention_mask.dtype}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
    return (attention_mask != 0).to(torch.int64)


def check_input_ids(input_ids: torch.Tensor) -> None:
    """``input_ids`` is ``[B, S]`` int64 or int32, or a ``ValueError``/``TypeError`` says otherwise."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")


def check_input_shape(shape: torch.Size, limit: int) -> None:
    """A ``[B, S]`` batch with rows, tokens, and at most ``limit`` (the position limit) of them."""
    if shape[0] == 0:
        raise ValueError("empty batch: inputs have 0 rows")
    if shape[1] == 0:
        raise ValueError("empty sequences: inputs have 0 tokens")
    if shape[1] > limit:
        raise ValueError(f"sequence length {shape[1]} exceeds the model's position limit {limit}; truncate the inputs")


def raise_empty_rows(mask: torch.Tensor) -> None:
    """The error for a ``[B, S]`` mask with rows of no token (the caller has found one)."""
    empty_rows = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    raise ValueError(f"attention_mask rows {empty_rows[:10]} have no tokens; every sample needs one")


def embed(
    model: nn.Module,
    arch: Architecture,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> EncoderInputs:
    """Checks the inputs the way a user needs to hear about them, then runs the embeddings."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    device = model_device(model)
    if input_ids is not None:
        check_input_ids(input_ids)
        shape, source = input_ids.shape, input_ids
    else:
        if inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [batch, sequence, hidden], got {tuple(inputs_embeds.shape)}")
        shape, source = inputs_embeds.shape[:2], inputs_embeds
    if source.device != device:
        raise ValueError(f"inputs are on {source.device} but the model is on {device}; move them with .to({device})")
    check_input_shape(shape, arch.max_length(model.config))
    for name, extra, taken in (
        ("token_type_ids", token_type_ids, arch.token_types),
        ("position_ids", position_ids, arch.positions),
    ):
        if extra is not None and not taken:
            raise ValueError(f"{model.config.model_type} models take no {name}")
    # position_ids may also be [1, S], shared by every row, as Hugging Face broadcasts them.
    for name, extra, shapes in (
        ("token_type_ids", token_type_ids, (shape,)),
        ("position_ids", position_ids, (shape, torch.Size([1, shape[1]]))),
    ):
        if extra is not None and (extra.shape not in shapes or extra.device != device):
            wanted = " or ".join(str(tuple(s)) for s in shapes)
            raise ValueError(f"{name} must be {wanted} on {device}, got {tuple(extra.shape)} on {extra.device}")
    mask = normalize_attention_mask(attention_mask, shape, device)
    padded = None
    # Data-dependent checks, eager only (a compiled graph cannot branch on tensor values). Both
    # facts come back in one host read: on a GPU, this forward's only sync outside compaction.
    if not torch.compiler.is_compiling():
        every_row_has_a_token, padded = host_read(torch.stack([mask.any(dim=1).all(), (mask == 0).any()]))
        if not every_row_has_a_token:
            raise_empty_rows(mask)
    hidden = arch.embed(model, arch.base_model(model), input_ids, token_type_ids, position_ids, inputs_embeds, mask)
    return EncoderInputs(hidden, mask, padded)


def layer_context(model: nn.Module, arch: Architecture, hidden: torch.Tensor, mask: torch.Tensor, padded=None):
    """What every layer needs for the current rows besides their hidden states (the attention mask,
    and per model type relative or rotary positions); rebuild it after every compaction."""
    return arch.context(model, hidden, mask, padded)


def run_layers(model: nn.Module, arch: Architecture, layers, hidden: torch.Tensor, context) -> torch.Tensor:
    """The output of ``layers`` (depths 0, 1, ...) on ``hidden``; only the last state is kept."""
    for index, layer in enumerate(layers):
        hidden = arch.run(model, index, layer, hidden, context)
    return hidden


def all_layer_states(model: nn.Module, arch: Architecture, inputs: EncoderInputs) -> list[torch.Tensor]:
    """Hidden states after every layer ``[L]`` x ``[B, S, H]``, with no exits (training, evaluation)."""
    context = layer_context(model, arch, inputs.hidden, inputs.mask, inputs.padded)
    hidden, states = inputs.hidden, []
    for index, layer in enumerate(arch.layers(model)):
        hidden = arch.run(model, index, layer, hidden, context)
        states.append(hidden)
    return states
