"""The request and response bodies of the HTTP API, as pydantic models: FastAPI validates every
body against them and publishes them in ``/openapi.json``.

``/predict`` and ``/`` take the shapes Hugging Face's inference servers take:

* Text Embeddings Inference (TEI): ``{"inputs": ..., "truncate": bool, "raw_scores": bool}``;
* the Hugging Face inference API: ``{"inputs": ..., "parameters": {"top_k", "function_to_apply",
  "truncate"}}``.

``inputs`` is one text, a list of texts, one sentence pair (``{"text", "text_pair"}``, as the
transformers pipeline takes it) or a list of pairs (``[["a", "b"], ...]`` or objects). A list of
two strings is two texts, as in the transformers pipeline (TEI would read it as one pair; its
``[["a", "b"]]`` means one pair here too).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class _Strict(BaseModel):
    # Unknown fields are refused by name: a misspelt "speeed" must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class TextPair(_Strict):
    """A sentence pair, as the transformers text-classification pipeline takes it."""

    text: StrictStr
    text_pair: StrictStr


PairList = tuple[StrictStr, StrictStr]
Inputs = StrictStr | TextPair | list[StrictStr] | list[PairList] | list[TextPair]


class PredictParameters(_Strict):
    """The Hugging Face inference API's ``parameters`` of text classification."""

    top_k: StrictInt | None = Field(None, ge=1, description="the best k labels per input (default: every label)")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="what turns logits into scores (default: softmax)"
    )
    truncate: StrictBool | None = Field(None, description="cut inputs over the token limit instead of refusing them")


class PredictRequest(_Strict):
    """``POST /predict`` and ``POST /``."""

    inputs: Inputs
    parameters: PredictParameters | None = None
    truncate: StrictBool | None = Field(None, description="TEI's spelling of parameters.truncate")
    raw_scores: StrictBool = Field(False, description="TEI: the logits instead of softmax scores")
    truncation_direction: Literal["right", "Right"] = Field("right", description="TEI: only 'right' is supported")


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyRequest(_Strict):
    """``POST /classify``: this server's richer answer, with a per-request exit speed."""

    text: StrictStr | None = None
    texts: list[StrictStr] | None = None
    inputs: Inputs | None = Field(None, description="the /predict forms of input, pairs included")
    speed: StrictFloat | StrictInt | None = Field(
        None, description="the exit threshold in [0, 1] for this request (default: the served rule's)"
    )
    truncate: StrictBool | None = None


class ClassifyResult(BaseModel):
    label: int
    label_name: str | None
    scores: list[float]
    exit_layer: int = Field(description="1-based layer whose classifier answered (the number of layers: the teacher)")
    uncertainty: float = Field(description="the answering classifier's uncertainty under the rule's criterion")


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]
    rule: dict = Field(description="the exit rule that answered, speed included")


class ErrorResponse(BaseModel):
    """Every error, in TEI's shape."""

    error: str
    error_type: Literal["validation", "tokenizer", "empty", "overloaded", "unhealthy", "backend"]


class Health(BaseModel):
    status: Literal["ok", "draining", "unhealthy"]
    error: str | None = None


class Classifier(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class ModelKind(BaseModel):
    """TEI's ``model_type``: a sequence classifier and its labels."""

    classifier: Classifier


class Info(BaseModel):
    """``GET /info``: Text Embeddings Inference's fields (so that its clients read them), then this
    server's own: the architecture, layers, exit rule and its certificate."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_type: ModelKind
    max_concurrent_requests: int = Field(description="texts held by the engine at once; past it, 429")
    max_input_length: int = Field(description="tokens per text")
    max_batch_tokens: int = Field(description="tokens (rows x padded length) per layer call")
    max_batch_requests: int = Field(description="rows per layer call")
    max_client_batch_size: int = Field(description="texts per request")
    auto_truncate: bool
    version: str
    architecture: str = Field(description="the model's model_type: bert, roberta, ...")
    labels: list[str]
    num_layers: int
    exit_rule: dict
    certificate: dict | None = Field(description="what calibration certified for the rule, or null")
    quantization: str | None
    max_body_bytes: int
    max_wait_ms: float = Field(description="the engine's aging bound")
