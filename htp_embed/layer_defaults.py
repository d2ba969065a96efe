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


# Also what SmolLM2-135M (llama, 30 layers) measured best with: vanilla peaks at exit 29 (= -2;
# 52.0 NDCG@10 vs 31.4 at full depth), and HTP rewired 1-6 with a sink token in front beats
# vanilla there by +2.8 [+0.7, +4.8] (benchmarks/results/quality/tables.md, smollm2 sections).
PAPER_REFERENCE = LayerDefaults(1, 7, -2)

LAYER_DEFAULTS: dict[str, LayerDefaults] = {
    # Gemma3-270M (18 layers), SciFact train subsample (150 queries, 266 docs), see
    # benchmarks/results/quality/tables.md and sweep.json: the exit layer matters most
    # (vanilla 59.1 at full depth, 64.1 at 17, 69.1 at 13, 20.6 at 12); HTP rewired before
    # layers 1-6 and exiting after layer 13 was the best dense setting measured (71.2 NDCG@10,
    # +2.1 over vanilla at the same exit, inside the 95% CI of no difference).
    "gemma3_text": LayerDefaults(1, 7, 13),
    "gemma3": LayerDefaults(1, 7, 13),
}


def layer_defaults(model_type: str) -> LayerDefaults:
    """The defaults for an architecture, falling back to the paper's reference settings."""
    return LAYER_DEFAULTS.get(model_type, PAPER_REFERENCE)
