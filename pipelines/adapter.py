"""Fitting a per-index linear adapter from the corpus alone (the ``adapter`` correction).

Pairs come from the documents being indexed: a sentence of a node, embedded as a query (a
*pseudo-query*), and that node's vector. A square map ``A``, started at the identity, is
trained so that each pseudo-query, mapped, scores its own node above the other nodes of its
batch (InfoNCE with in-batch negatives, so the cost does not grow with the corpus), with a
penalty ``lam * ||A - I||^2`` that keeps it near the geometry the encoder gave. Queries and
documents go through the same map (on the development split, one shared map beat a query-side
one by about 2 NDCG@10 on dense search). Training stops when the held-out pseudo-queries'
mean reciprocal rank of their source node, among all the nodes of the sample, stops rising;
the best epoch's map is kept. A fixed seed makes the same corpus give the same map.

Choices (learning rate, temperature, penalty, batch) were made on half A of SciFact train over
the full corpus (``benchmarks/results/quality/adapter.md``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

MIN_PAIRS = 256
"""Fewer pairs than this fit noise: no adapter."""


@dataclass(frozen=True)
class AdapterFit:
    """The fitted map and what it was fitted on."""

    matrix: np.ndarray
    pairs: int
    epochs: int
    heldout_mrr: tuple[float, float]  # identity map, fitted map


def fit_linear_adapter(
    pseudo_queries: np.ndarray,
    nodes: np.ndarray,
    source: np.ndarray,
    *,
    temperature: float = 0.05,
    penalty: float = 1e-3,
    learning_rate: float = 1e-3,
    batch_size: int = 512,
    max_epochs: int = 30,
    patience: int = 3,
    heldout: float = 0.1,
    seed: int = 0,
) -> AdapterFit | None:
    """The map fitted on centred, normalised vectors: ``pseudo_queries[i]`` came from node
    ``source[i]`` (a row of ``nodes``). None when there are fewer than `MIN_PAIRS` pairs."""
    queries = torch.as_tensor(np.asarray(pseudo_queries, dtype=np.float32))
    docs = torch.as_tensor(np.asarray(nodes, dtype=np.float32))
    owner = torch.as_tensor(np.asarray(source, dtype=np.int64))
    n, dim = queries.shape
    if n < MIN_PAIRS:
        log.warning("only %d pseudo-query pairs: no adapter fitted (needs %d)", n, MIN_PAIRS)
        return None
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    held = order[: max(1, int(n * heldout))]
    train = order[len(held):]
    identity = torch.eye(dim)
    with torch.enable_grad():
        delta = torch.zeros(dim, dim, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=learning_rate)
        start = best = _heldout_mrr(queries[held], owner[held], docs, identity)
        best_map, best_epoch, stale, epoch = identity.clone(), 0, 0, 0
        for epoch in range(1, max_epochs + 1):
            shuffled = train[torch.randperm(len(train), generator=generator)]
            for first in range(0, len(shuffled), batch_size):
                batch = shuffled[first : first + batch_size]
                if len(batch) < 2:
                    continue
                mapped = identity + delta
                q = torch.nn.functional.normalize(queries[batch] @ mapped.T, dim=-1)
                d = torch.nn.functional.normalize(docs[owner[batch]] @ mapped.T, dim=-1)
                logits = q @ d.T / temperature
                # another pseudo-query of the same node is not a negative
                same = owner[batch][:, None] == owner[batch][None, :]
                logits = logits.masked_fill(same & ~torch.eye(len(batch), dtype=torch.bool), float("-inf"))
                loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
                loss = loss + penalty * delta.pow(2).sum()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            score = _heldout_mrr(queries[held], owner[held], docs, identity + delta.detach())
            if score > best + 1e-4:
                best, best_map, best_epoch, stale = score, (identity + delta.detach()).clone(), epoch, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    log.info("fitted the adapter on %d pairs: held-out MRR %.3f -> %.3f (epoch %d of %d)",
             n, start, best, best_epoch, epoch)
    return AdapterFit(best_map.numpy(), n, best_epoch, (start, best))


def _heldout_mrr(queries: torch.Tensor, owner: torch.Tensor, docs: torch.Tensor, mapped: torch.Tensor) -> float:
    """Mean reciprocal rank of each held-out pseudo-query's source node among all ``docs``."""
    with torch.no_grad():
        q = torch.nn.functional.normalize(queries @ mapped.T, dim=-1)
        d = torch.nn.functional.normalize(docs @ mapped.T, dim=-1)
        scores = q @ d.T
        positive = scores[torch.arange(len(q)), owner]
        rank = (scores > positive[:, None]).sum(1) + 1
        return float((1.0 / rank.float()).mean())
