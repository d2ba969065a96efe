"""One forward pass, every exit layer: fills the evaluation cache for a whole exit-layer sweep.

CPU time is the scarce resource of the quality study (~550 tokens/s on 2 cores, shared). An
exit-layer sweep through the public API costs one full pass over the corpus per exit layer,
although the hidden states of every layer are computed anyway by the deepest one. This module
runs the encoder's own layout, placeholder initialisation and rewiring hooks once at full depth,
pools the output of *every* decoder layer as it is produced, and stores each layer's vectors in
:class:`pipelines.evaluation.EmbeddingCache` under the identity of the sibling encoder that
would have produced them (``encoder.with_method(method, exit_layer=d)``). ``evaluate`` on those
siblings is then a cache hit.

It uses the encoder's private helpers (``layouts``, ``_collate``, ``_layers``, the placeholder
vector): benchmark code only, and :func:`check_against_encoder` verifies the vectors against the
public ``encode`` path on a few texts before a sweep trusts them.

Why this is exact: pooling happens in a forward hook on layer d-1, before the rewiring
pre-hook of layer d (which writes in place) runs, and the encoder at exit d never rewires layer
d or later. The full-depth pass also yields the final-norm output (``exit_layer=None``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from htp_embed import HTPEncoder
from htp_embed.pooling import at_positions, l2_normalise, masked_mean
from htp_embed.rewiring import rewired
from pipelines.beir import BeirDataset
from pipelines.evaluation import EmbeddingCache

Readouts = dict[tuple[str, int | None], np.ndarray]
"""(readout, exit depth or None for full depth with final norm) -> [n, dim] vectors."""

READOUTS = ("mean", "last", "mean-skip1")
# Readouts the encoder itself does not offer are stored under an identity marked as such.
EXTRA_IDENTITY = {"mean-skip1": {"pool": "mean-without-first-text-token"}}


class CachedVariant:
    """An encoder identity for vectors that only :func:`prime_cache` produces (e.g. mean pooling
    without the first text token, a diagnostic of the attention sink on models without BOS).
    It can only be scored from the cache: encoding raises instead of computing something else."""

    def __init__(self, encoder: HTPEncoder, readout: str = "", extra: dict[str, Any] | None = None):
        self.encoder = encoder
        self.dtype = encoder.dtype
        self.extra = {**EXTRA_IDENTITY.get(readout, {}), **(extra or {})}

    def identity(self) -> dict[str, Any]:
        return {**self.encoder.identity(), **self.extra}

    def describe(self) -> str:
        return self.encoder.describe() + str(self.extra)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        raise RuntimeError("only available from the cache: run prime_cache first")

    encode_documents = encode_queries


def encode_all_exits(encoder: HTPEncoder, texts: Sequence[str], *, is_query: bool) -> Readouts:
    """Mean-pooled (and last-token) vectors of every layer's output for ``texts``.

    ``encoder`` must run at full depth (``exit_layer=None``) so that its rewiring range is not
    clamped. Keys: ``("mean", d)`` and ``("last", d)`` for d in 1..L, and the same with None for
    the final-norm output.
    """
    if encoder.exit_depth is not None:
        raise ValueError("encode_all_exits needs an encoder built with exit_layer=None")
    n, dim = len(texts), encoder.dim
    depths: list[int | None] = [*range(1, len(encoder._layers) + 1), None]
    out: Readouts = {(kind, d): np.empty((n, dim), np.float32) for kind in READOUTS for d in depths}
    layouts = encoder.layouts(texts, is_query=is_query)
    order = sorted(range(n), key=lambda i: -len(layouts[i]))
    bar = tqdm(total=n, desc=f"all exits ({encoder.config.method})", unit="text", leave=False)
    for begin in range(0, n, encoder.config.batch_size):
        chunk = order[begin : begin + encoder.config.batch_size]
        pooled = _pool_every_layer(encoder, encoder._collate([layouts[i] for i in chunk]))
        rows = np.array(chunk)
        for depth, vectors in pooled.items():
            for kind, vector in zip(READOUTS, vectors, strict=True):
                out[(kind, depth)][rows] = l2_normalise(vector).cpu().numpy()
        bar.update(len(chunk))
    bar.close()
    return out


def _pool_every_layer(encoder: HTPEncoder, batch: Any) -> dict[int | None, tuple[torch.Tensor, ...]]:
    """The READOUTS of every layer's output for one collated batch."""
    layers = encoder._layers
    pooled: dict[int | None, tuple[torch.Tensor, ...]] = {}
    rows = torch.arange(batch.pool.shape[0], device=batch.pool.device)
    skip_first = batch.pool.clone()
    skip_first[rows, batch.pool.argmax(dim=1)] = 0.0

    def readouts(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (masked_mean(hidden, batch.pool), at_positions(hidden, batch.readout),
                masked_mean(hidden, skip_first))

    def capture(depth: int):
        def hook(module, args, output):
            pooled[depth] = readouts(output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [layer.register_forward_hook(capture(i + 1)) for i, layer in enumerate(layers)]
    try:
        with encoder._lock, torch.inference_mode():
            embeds = encoder.model.get_input_embeddings()(batch.ids)
            embeds = torch.where(
                batch.placeholder.unsqueeze(-1), encoder._placeholder_vector.to(embeds.dtype), embeds
            )
            with rewired(layers, encoder.rewire_layers, batch.src, batch.dst, None):
                output = encoder.model(
                    inputs_embeds=embeds, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False,
                )
            pooled[None] = readouts(output.last_hidden_state)
    finally:
        for handle in handles:
            handle.remove()
    return pooled


def with_sink_prefix(encoder: HTPEncoder, token_id: int) -> tuple[HTPEncoder, dict[str, Any]]:
    """A sibling whose layouts start with ``token_id`` (never pooled, never overwritten), and the
    identity marker for it. Diagnostic for models without BOS (SmolLM2): there the first slot
    of the sequence, the attention sink, is an HTP placeholder that rewiring overwrites."""
    sibling = encoder.with_method(encoder.config.method)
    sibling._builder.prefix = [token_id, *sibling._builder.prefix]
    return sibling, {"sink_prefix": token_id}


def prime_cache(
    base: HTPEncoder,
    dataset: BeirDataset,
    cache: EmbeddingCache,
    *,
    readouts: Iterable[tuple[str, str]] = (("mean", ""),),
    depths: Iterable[int | None] | None = None,
    identity_extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Fill ``cache`` with the vectors of ``base``'s method at every exit depth, in one pass.

    ``readouts`` pairs a readout (one of READOUTS) with the method name it is stored under
    ("" = the base encoder's method); e.g. ``[("mean", "vanilla"), ("last", "last")]`` stores
    vanilla and last-token pooling from the same pass. Returns the sibling identities stored.
    Skips the pass entirely when every entry is already cached. ``identity_extra`` marks
    vectors of a modified encoder (see :func:`with_sink_prefix`).
    """
    readouts = [(r, m or base.config.method) for r, m in readouts]
    n_layers = len(base._layers)
    wanted = list(depths) if depths is not None else [*range(1, n_layers + 1), None]
    stored = []
    parts = (("documents", dataset.doc_texts(), dataset.corpus_hash(), False),
             ("queries", dataset.query_texts(), dataset.queries_hash(), True))
    for kind, texts, content_hash, is_query in parts:
        targets = []
        for readout, method in readouts:
            for depth in wanted:
                sibling = base.with_method(method, exit_layer=depth)
                identity = {**sibling.identity(), **EXTRA_IDENTITY.get(readout, {}), **(identity_extra or {})}
                key = cache.key(identity, kind, content_hash, str(sibling.dtype))
                if not (cache.root / f"{key}.npy").exists():
                    targets.append((readout, depth, key, identity))
        if not targets:
            continue
        vectors = encode_all_exits(base, texts, is_query=is_query)
        for readout, depth, key, identity in targets:
            cache.save(key, vectors[(readout, depth)], {
                "identity": identity, "dtype": str(base.dtype), "kind": kind,
                "content_hash": content_hash, "dataset": dataset.name, "rows": len(texts),
                "dim": base.dim, "primed_by": "benchmarks/quality/multi_exit.py",
            })
            stored.append(identity)
    return stored


def check_against_encoder(base: HTPEncoder, texts: Sequence[str], depths: Sequence[int | None],
                          readout: str = "mean", method: str | None = None) -> float:
    """Largest absolute difference between the one-pass vectors and the public ``encode`` path."""
    method = method or base.config.method
    all_exits = encode_all_exits(base, texts, is_query=False)
    worst = 0.0
    for depth in depths:
        reference = base.with_method(method, exit_layer=depth, show_progress=False).encode_documents(texts)
        worst = max(worst, float(np.abs(all_exits[(readout, depth)] - reference).max()))
    return worst
