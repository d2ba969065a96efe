"""An encoder's identity: everything that decides its vectors, as recorded in an index.

An index records the identity of the encoder that built it and refuses vectors from any other;
reopening the index rebuilds that encoder from the record. Both directions live on one model,
:class:`EncoderIdentity`, next to each other, so a setting cannot be recorded without being
restored: ``record()`` writes the manifest's dict, ``from_record()`` reads it back,
``to_config()`` turns it into the :class:`~htp_embed.config.EncoderConfig` that reproduces it.
Records are written in one canonical form (``record()``), so they are compared as plain JSON
documents: :func:`indexes.same_encoder`, the one comparison, does that without knowing
this package.

What an identity cannot name (the tokenizer, the rest of ``config.json``, how this package
computes) is checked by behaviour instead: each index version also records the vectors its
encoder gave for a few fixed texts, and the pipeline compares (``pipelines/encoder_check.py``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from htp_embed.config import EncoderConfig, KPolicy, Method

# Recorded only by the methods they concern (see EncodingMethod.identity_fields), so a record
# omits them rather than writing null: the format indexes on disk already have.
OPTIONAL_FIELDS = ("rewire", "attention_sink", "k", "segmenter", "global_tokens", "local_tokens")


class EncoderIdentity(BaseModel):
    """What decides an encoder's vectors; the dict form is what index manifests store.

    ``exit_layer`` is the resolved depth (1-based, ``None`` = full model with final norm) and
    ``rewire`` the resolved ``[start, stop)`` layer range, not the per-model "default"
    placeholders, so a record means the same thing whatever the defaults become.
    ``attention_sink`` is the sink token's id when one was put first (indexes from before
    the option never had one).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str
    model_fingerprint: str
    method: Method
    dim: int
    exit_layer: int | None
    max_length: int
    query_instruction: str
    rewire: tuple[int, int] | None = None
    attention_sink: int | None = None
    k: str | None = None
    segmenter: str | None = None
    global_tokens: bool | None = None
    local_tokens: bool | None = None

    @field_validator("k", mode="before")
    @classmethod
    def _canonical_k(cls, value: object) -> str | None:
        # "adaptive" and "adaptive:8" are one policy; record the spelling str(KPolicy) writes.
        return None if value is None else str(KPolicy.parse(value))  # type: ignore[arg-type]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EncoderIdentity:
        """Read an identity as stored in a manifest (any version this package has written)."""
        return cls.model_validate(record)

    def record(self) -> dict[str, Any]:
        """The JSON-ready dict a manifest stores: optional fields omitted when absent."""
        data = self.model_dump(mode="json")
        return {key: value for key, value in data.items() if not (key in OPTIONAL_FIELDS and value is None)}

    def to_config(self, **overrides: Any) -> EncoderConfig:
        """The configuration that reproduces this encoder.

        ``overrides`` may change settings that do not alter vectors (device, batch size,
        progress); passing a vector-deciding one builds a different encoder, on purpose.
        """
        settings: dict[str, Any] = {
            "model": self.model,
            "method": self.method,
            "exit_layer": self.exit_layer,
            "max_length": self.max_length,
            "query_instruction": self.query_instruction,
            # a sink token is recorded exactly when one was used, so "auto" finds it again
            "attention_sink": "auto" if self.attention_sink is not None else "off",
        }
        if self.rewire is not None:
            settings["rewire_start"], settings["rewire_stop"] = self.rewire
        for key in ("k", "segmenter", "global_tokens", "local_tokens"):
            value = getattr(self, key)
            if value is not None:
                settings[key] = value
        return EncoderConfig(**{**settings, **overrides})


def config_from_identity(identity: dict[str, Any], **overrides: Any) -> EncoderConfig:
    """The configuration that reproduces an encoder from its :meth:`HTPEncoder.identity` record.

    Used to reopen an index with exactly the encoder that built it; ``overrides`` may change
    settings that do not alter vectors (device, batch size, progress).
    """
    return EncoderIdentity.from_record(identity).to_config(**overrides)
