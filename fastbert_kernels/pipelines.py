"""A Hugging Face text-classification pipeline that runs a patched model at a speed.

A plain ``transformers.pipeline("text-classification", model=patched)`` runs at the model's
exit rule's speed (``fbk.fastbert_config(model).exit_rule``, which :func:`fastbert_kernels.calibrate`
writes; set one with ``fbk.patch(model, exit_rule=fbk.ExitRule(speed=0.5))``); it has no way to
pass ``speed`` per call.
:func:`pipeline` builds the same pipeline with a ``speed`` argument, per pipeline or per call, and
adds each result's ``exit_layer``::

    classify = fbk.pipeline(model, tokenizer, speed=0.5)
    classify("a gripping, beautifully shot film")            # {'label': ..., 'score': ..., 'exit_layer': 2}
    classify(["...", "..."], speed=0.8, batch_size=32)
"""

from __future__ import annotations

from typing import Any

from transformers import TextClassificationPipeline
from transformers import pipeline as hf_pipeline

from .config import check_speed
from .modeling import is_patched


class FastBertTextClassificationPipeline(TextClassificationPipeline):
    """``TextClassificationPipeline`` with a ``speed`` parameter and the exit layer in each result."""

    def _sanitize_parameters(self, speed=None, **kwargs):
        preprocess, forward, postprocess = super()._sanitize_parameters(**kwargs)
        if speed is not None:
            forward = {**forward, "speed": check_speed(speed)}
        return preprocess, forward, postprocess

    def _forward(self, model_inputs, speed: float | None = None):
        return self.model(**model_inputs) if speed is None else self.model(**model_inputs, speed=speed)

    def postprocess(self, model_outputs, **kwargs) -> Any:
        result = super().postprocess(model_outputs, **kwargs)
        exit_layer = int(model_outputs["exit_layer"][0])
        if isinstance(result, dict):
            return {**result, "exit_layer": exit_layer}
        return [{**entry, "exit_layer": exit_layer} for entry in result]


def pipeline(model, tokenizer=None, speed: float | None = None, **kwargs) -> FastBertTextClassificationPipeline:
    """A text-classification pipeline over a patched model; ``speed`` (here or per call) defaults to
    the speed of the model's exit rule. Other keyword arguments go to ``transformers.pipeline``."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched; call fastbert_kernels.patch(model) first")
    if speed is not None:
        kwargs["speed"] = check_speed(speed)
    return hf_pipeline(
        "text-classification",
        model=model,
        tokenizer=tokenizer,
        pipeline_class=FastBertTextClassificationPipeline,
        **kwargs,
    )
