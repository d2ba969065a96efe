"""Table 1: every pooling method at the same exit layer, plus BM25 and MiniLM references.

    nice -n 5 .venv/bin/python benchmarks/quality/methods.py [gemma3-270m|smollm2-135m|refs] ...

Each dense method is computed once at full depth with all exit layers pooled (multi_exit.py),
so the table at exit -2 and the exit-layer curves of table 2 come from the same pass.
Rows go to ``benchmarks/results/quality/methods.json`` as they are measured.
"""

from __future__ import annotations

from common import cache, load_base, load_sample, score
from multi_exit import CachedVariant, prime_cache

from htp_embed.layer_defaults import layer_defaults

TABLE = "methods"


def references() -> None:
    dataset = load_sample()
    score(TABLE, "bm25", dataset, "bm25")
    score(TABLE, "minilm", dataset, "minilm")


def label(encoder) -> str:
    extra = ""
    if encoder.config.method == "htp":
        if not encoder.config.global_tokens:
            extra = ",local-only"
        if not encoder.config.local_tokens:
            extra = ",global-only"
    return encoder.describe().replace("]", extra + "]")


def dense(model: str, methods: list[str], exits: list[int | None]) -> None:
    """Prime every method's all-exit vectors, then score the requested exits."""
    dataset = load_sample()
    store = cache()
    base = load_base(model)
    n_layers = len(base._layers)
    defaults = layer_defaults(base.model.config.model_type)
    # Without a BOS token the first text token is the attention sink: measure pooling without it.
    vanilla_readouts = [("mean", "vanilla"), ("last", "last")]
    if not base._template[0]:
        vanilla_readouts.append(("mean-skip1", "vanilla"))
    plan = {
        "vanilla": (base, vanilla_readouts),
        "htp": (base.with_method("htp", k=1, exit_layer=None), [("mean", "")]),
        "htp-adaptive": (base.with_method("htp", k="adaptive:8", exit_layer=None), [("mean", "")]),
        "tp": (base.with_method("tp", exit_layer=None), [("mean", "")]),
        "prompteol": (base.with_method("prompteol", exit_layer=None), [("last", "")]),
        "echo": (base.with_method("echo", exit_layer=None), [("mean", "")]),
    }
    for name in methods:
        encoder, readouts = plan[name]
        prime_cache(encoder, dataset, store, readouts=readouts)
        for readout, method in readouts:
            method = method or encoder.config.method
            for exit_layer in exits:
                sibling = encoder.with_method(method, exit_layer=exit_layer)
                scored = CachedVariant(sibling, readout) if readout == "mean-skip1" else sibling
                name = label(sibling).replace("]", ",skip-first]") if readout == "mean-skip1" else label(sibling)
                score(TABLE, name, dataset, scored, model=model, layers=n_layers,
                      exit_depth=sibling.exit_depth, rewire_default=[defaults.rewire_start, defaults.rewire_stop])


def main(args: list[str]) -> None:
    targets = args or ["refs", "gemma3-270m"]
    for target in targets:
        if target == "refs":
            references()
        else:
            model, _, methods = target.partition(":")
            chosen = methods.split(",") if methods else ["vanilla", "htp", "htp-adaptive", "tp", "prompteol", "echo"]
            dense(model, chosen, [-2, -6, None])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="'refs' (BM25 and MiniLM references) or MODEL[:METHOD,...] (every method by "
                        "default); default: refs gemma3-270m")
    main(parser.parse_args().targets)
