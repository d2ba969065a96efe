"""Table 2: HTP layer settings against vanilla mean pooling at the same exit layer.

    nice -n 5 .venv/bin/python benchmarks/quality/sweep.py [gemma3-270m] [VARIANT ...]

Each variant (rewiring range, local/global placeholders, K) is one full-depth pass whose every
layer is pooled (multi_exit.py); vanilla comes from the same cache as table 1. Every exit
layer is scored, so the table can compare each HTP setting with vanilla at the same exit.
Rows go to ``benchmarks/results/quality/sweep.json`` as they are measured.
"""

from __future__ import annotations

from typing import Any

from common import cache, load_base, load_sample, score
from multi_exit import CachedVariant, prime_cache, with_sink_prefix

from htp_embed import HTPEncoder
from pipelines.beir import BeirDataset

TABLE = "sweep"

# In priority order: the paper's range, the shallowest range, each placeholder kind alone,
# deeper ranges, then fewer blocks.
VARIANTS: dict[str, dict[str, Any]] = {
    "k1-r1-3": {"k": 1, "rewire_start": 1, "rewire_stop": 3},
    "k1-r1-7": {"k": 1, "rewire_start": 1, "rewire_stop": 7},
    "k1-r1-2": {"k": 1, "rewire_start": 1, "rewire_stop": 2},
    "local-r1-3": {"k": 1, "rewire_start": 1, "rewire_stop": 3, "global_tokens": False},
    "global-r1-3": {"k": 1, "rewire_start": 1, "rewire_stop": 3, "local_tokens": False},
    "k1-r4-8": {"k": 1, "rewire_start": 4, "rewire_stop": 8},
    "k1-r8-12": {"k": 1, "rewire_start": 8, "rewire_stop": 12},
    "k4-r1-3": {"k": 4, "rewire_start": 1, "rewire_stop": 3},
    "k1-r2-5": {"k": 1, "rewire_start": 2, "rewire_stop": 5},
    "k1-r1-4": {"k": 1, "rewire_start": 1, "rewire_stop": 4},
    "k2-r1-3": {"k": 2, "rewire_start": 1, "rewire_stop": 3},
    # Rewiring from layer 0 overwrites the placeholders' initial vectors before any layer reads
    # them, so this isolates the effect of the placeholder initialisation (mean embedding).
    "k1-r0-3": {"k": 1, "rewire_start": 0, "rewire_stop": 3},
    "k1-r1-3-sentencizer": {"k": 1, "rewire_start": 1, "rewire_stop": 3, "segmenter": "sentencizer"},
    "k1-r12-13": {"k": 1, "rewire_start": 12, "rewire_stop": 13},
}
# smollm2-135m (30 layers): the paper's default range and a shallow one.
VARIANTS_SMOLLM = {
    "k1-r1-7": {"k": 1, "rewire_start": 1, "rewire_stop": 7},
    # SmolLM2 adds no BOS: the sequence's first slot (the attention sink) is then a placeholder
    # that rewiring overwrites. "sink" variants put <|endoftext|> (id 0) in front of everything.
    "sink-vanilla": {"_method": "vanilla", "_sink": 0},
    "sink-k1-r1-7": {"k": 1, "rewire_start": 1, "rewire_stop": 7, "_sink": 0},
    "k1-r1-3": {"k": 1, "rewire_start": 1, "rewire_stop": 3},
    "local-r1-3": {"k": 1, "rewire_start": 1, "rewire_stop": 3, "global_tokens": False},
    "sink-k1-r1-3": {"k": 1, "rewire_start": 1, "rewire_stop": 3, "_sink": 0},
}


def variants_of(model: str) -> dict[str, dict[str, Any]]:
    return VARIANTS if "gemma" in model else VARIANTS_SMOLLM


def run_variant(table: str, model: str, dataset: BeirDataset, base: HTPEncoder, name: str,
                settings: dict[str, Any]) -> None:
    """One full-depth pass for a variant (a cache hit when primed before), scored at every exit."""
    settings = dict(settings)
    method, sink = settings.pop("_method", "htp"), settings.pop("_sink", None)
    encoder = base.with_method(method, exit_layer=None, **settings)
    extra: dict[str, Any] = {}
    if sink is not None:
        encoder, extra = with_sink_prefix(encoder, sink)
    prime_cache(encoder, dataset, cache(), identity_extra=extra)
    for exit_layer in [*range(1, len(base._layers) + 1), None]:
        sibling = encoder.with_method(method, exit_layer=exit_layer)
        scored = CachedVariant(sibling, extra=extra) if extra else sibling
        variant = name if method == "vanilla" else f"htp:{name}"
        score(table, f"{model}/{variant}/exit={exit_layer or 'full'}", dataset, scored,
              model=model, variant=variant, exit_depth=exit_layer, settings=settings)


def run_vanilla(table: str, model: str, dataset: BeirDataset, base: HTPEncoder) -> None:
    """Vanilla at every exit; without a BOS token also pooled without the first text token
    (the attention sink)."""
    no_bos = not base._template[0]
    readouts = [("mean", "vanilla"), *([("mean-skip1", "vanilla")] if no_bos else [])]
    prime_cache(base, dataset, cache(), readouts=readouts)
    for exit_layer in [*range(1, len(base._layers) + 1), None]:
        sibling = base.with_method("vanilla", exit_layer=exit_layer)
        score(table, f"{model}/vanilla/exit={exit_layer or 'full'}", dataset, sibling,
              model=model, variant="vanilla", exit_depth=exit_layer)
        if no_bos:
            score(table, f"{model}/vanilla-skip-first/exit={exit_layer or 'full'}", dataset,
                  CachedVariant(sibling, "mean-skip1"), model=model, variant="vanilla-skip-first",
                  exit_depth=exit_layer)


def run(model: str, names: list[str]) -> None:
    dataset = load_sample()
    base = load_base(model)
    run_vanilla(TABLE, model, dataset, base)
    variants = variants_of(model)
    for name in names or list(variants):
        run_variant(TABLE, model, dataset, base, name, variants[name])


def main(args: list[str]) -> None:
    model = args[0] if args else "gemma3-270m"
    run(model, args[1:])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3-270m", help="model to sweep (default: %(default)s)")
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help="variants of VARIANTS (or VARIANTS_SMOLLM for smollm2) to run (default: all)")
    args = parser.parse_args()
    main([args.model, *args.variants])
