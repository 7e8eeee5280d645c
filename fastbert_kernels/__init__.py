"""fastbert_kernels: batched FastBERT early exit for Hugging Face BERT-family classifiers.

    import fastbert_kernels as fbk
    model = fbk.patch(AutoModelForSequenceClassification.from_pretrained(path))
    fbk.distill(model, unlabelled_texts, tokenizer)
    fbk.calibrate(model, held_out_texts, tokenizer, max_disagreement=0.01)  # certified, label-free
    out = model(**batch)                     # out.logits [B, C], out.exit_layer [B], out.uncertainty [B]
    fbk.save_pretrained(model, d, tokenizer=tokenizer); model, tokenizer = fbk.load_checkpoint(d)

Importing never fails for a missing compiled build: the ops fall back to plain torch, and
``python -m fastbert_kernels env`` says what each device will use.
"""

from __future__ import annotations

from . import ops
from .architectures import ARCHITECTURES
from .branch import BranchClassifier
from .calibration import Calibration, ExitProfile, ExitSetting, calibrate, choose_speed, exit_profile
from .checkpoint import save_pretrained
from .config import FastBertConfig
from .corpus import classify_corpus
from .exit_rule import ExitRule
from .modeling import FastBertOutput, fastbert_config, is_patched, patch, students, unpatch
from .onnx_export import OnnxFastBert, export_onnx, quantize_onnx
from .pipelines import FastBertTextClassificationPipeline, pipeline
from .quantization import quantize
from .serialization import from_pretrained, load_checkpoint
from .serving import Engine, EngineResult
from .training import TrainHistory, TrainingOptions, distill, fine_tune, student_kl

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "BranchClassifier",
    "Calibration",
    "Engine",
    "EngineResult",
    "ExitProfile",
    "ExitRule",
    "ExitSetting",
    "FastBertConfig",
    "FastBertOutput",
    "FastBertTextClassificationPipeline",
    "OnnxFastBert",
    "TrainHistory",
    "TrainingOptions",
    "__version__",
    "calibrate",
    "choose_speed",
    "classify_corpus",
    "distill",
    "exit_profile",
    "export_onnx",
    "fastbert_config",
    "fine_tune",
    "from_pretrained",
    "is_patched",
    "load_checkpoint",
    "ops",
    "patch",
    "pipeline",
    "quantize",
    "quantize_onnx",
    "save_pretrained",
    "student_kl",
    "students",
    "unpatch",
]
