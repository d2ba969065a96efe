"""Self-check: one-pass all-exit vectors equal the public encode path (run before trusting sweeps)."""

from __future__ import annotations

from common import load_base, load_sample
from multi_exit import check_against_encoder


def main(model: str = "gemma3-270m") -> None:
    texts = load_sample().doc_texts()[:4]
    texts = [t[:400] for t in texts]
    base = load_base(model, show_progress=False)
    print("vanilla mean", check_against_encoder(base, texts, [3, 9, 17, None]))
    print("last", check_against_encoder(base, texts, [9, 17], readout="last", method="last"))
    htp = base.with_method("htp", k=1, rewire_start=1, rewire_stop=7, exit_layer=None)
    print("htp 1-7", check_against_encoder(htp, texts, [2, 5, 7, 12, None]))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3-270m", help="model to check (default: %(default)s)")
    main(parser.parse_args().model)
