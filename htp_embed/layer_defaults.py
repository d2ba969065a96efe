"""Per-architecture defaults for the HTP layer settings.

Keyed on ``config.model_type``. Values are (rewire_start, rewire_stop, exit_layer) with the
conventions of :class:`~htp_embed.config.EncoderConfig`. The paper's reference uses rewiring
before layers 1-6 and exits at the second-to-last layer (Mistral-7B). On small models those
settings were measured to hurt (shared/docs/HTP.md); the numbers below come from the sweep in
``benchmarks/results/quality/`` and name their source.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerDefaults:
    rewire_start: int
    rewire_stop: int
    exit_layer: int | None


PAPER_REFERENCE = LayerDefaults(1, 7, -2)

LAYER_DEFAULTS: dict[str, LayerDefaults] = {
    # Provisional until the quality sweep: shallow rewiring recovered most of the loss on
    # Gemma3-270M in the first check (HTP.md: rewire 1-3 beat 1-6 by 1.2 NDCG@10).
    "gemma3_text": LayerDefaults(1, 3, -2),
    "gemma3": LayerDefaults(1, 3, -2),
}


def layer_defaults(model_type: str) -> LayerDefaults:
    """The defaults for an architecture, falling back to the paper's reference settings."""
    return LAYER_DEFAULTS.get(model_type, PAPER_REFERENCE)
