"""Query-likelihood reranking with the decoder the encoder has already loaded.

A passage is scored for a query by how likely the decoder finds the query after reading the
passage: the mean log-probability of the query's tokens behind a prompt that holds the
passage (UPR, "Improving Passage Retrieval with Zero-Shot Question Generation", Sachan et al.,
2022). Nothing is trained and no second model is loaded: the encoder's weights run to their
last layer (the encoder itself exits early) and the tied input embeddings serve as the output
head. The cost is one full forward pass over every candidate passage, so the scorer reads a
window of each long passage (its heading and the sentences that best match the query:
:mod:`htp_embed.passage_window`) and sorts them by length into batches; see
benchmarks/quality/rerank.py for what it buys and costs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from htp_embed.encoder import shared_governor, shared_lock, special_token_template
from htp_embed.passage_window import best_windows
from htp_embed.segment import sentence_starts

# The likelihood's share of the blended score (both sides z-scored over the candidates), chosen
# on half A of the SciFact development split (404 queries) through the product
# (benchmarks/results/quality/rerank_best64_depth10.md): 0.6 scored best there with the default
# passage windows (76.0 vs 73.2 NDCG@10 without reranking; 0.5-0.7 within 0.6) and gives 73.1
# vs 70.5 on the untouched half B; the likelihood alone (weight 1) ranks worse than the blend
# on both halves. (The first-256-token scorer had chosen 0.6 too: rerank_start256_depth10.md.)
DEFAULT_WEIGHT = 0.6

# UPR's prompt: a passage, then the question it prompts. Generic on purpose (questions, claims
# and keyword queries all read as the text a passage makes one write).
PROMPT_BEFORE = "Passage: "
PROMPT_AFTER = "\nPlease write a question based on this passage.\nQuestion: "


class RerankUnavailableError(RuntimeError):
    """The loaded decoder cannot score text: its output head is not its input embeddings."""


@dataclass(frozen=True)
class ScoredPassage:
    """A passage's query likelihood (mean log-probability per query token, <= 0) and how many of
    its tokens were read (after truncation)."""

    log_likelihood: float
    passage_tokens: int


#: Tokens of each passage the scorer reads, and which: "best" reads a long passage's heading and
#: its sentences that best match the query, "start" its first tokens. Chosen on half A of the
#: SciFact development split: 64 tokens of the best window reranked better than the first 256
#: (+2.6 against +2.2 NDCG@10 on the untouched half B) in 2.5x less time
#: (benchmarks/results/quality/rerank_best64_depth10.md, rerank_start256_depth10.md).
DEFAULT_PASSAGE_TOKENS = 64
PassageWindow = Literal["best", "start"]
#: Query tokens scored: the likelihood of a query's first tokens. Read whole, a 4,096-character
#: query took 16 s to rerank ten hits (its logits alone are query tokens x hits x vocabulary)
#: and held up every plain query the service answered meanwhile; queries are ~10-30 tokens.
MAX_QUERY_TOKENS = 128
#: Rows of the output head's logits turned into log-probabilities at once: the float32 copy of
#: a few rows stays in the cache (all rows at once: ~150 MB written and read back, 0.1 s a query).
LOGIT_ROWS = 16


class QueryLikelihoodScorer:
    """Scores passages for a query with a decoder's language-model head.

    ``max_passage_tokens`` bounds what is read of each passage (the cost grows with it) and
    ``window`` says which part of a longer one ("best": its heading and the sentences that
    best match the query, found with the ``segmenter``'s sentences; "start": its first
    tokens); ``batch_tokens`` bounds the tokens of one forward pass. Passes hold the model's
    shared lock (an encoder installs hooks on the same modules while it computes), so batches are kept short enough
    (~0.8 s on 2 cores) for a service's query embeddings to get in between. That costs ~10%:
    ten SciFact abstracts took 3.20 s in batches of 1,024 tokens and 2.91 s in one of 4,096
    (AMD EPYC, 2 cores, bf16, interleaved); pass a larger ``batch_tokens`` for offline work.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_passage_tokens: int = DEFAULT_PASSAGE_TOKENS,
                 window: PassageWindow = "best", segmenter: str = "senter", batch_tokens: int = 1024):
        if max_passage_tokens < 1:
            raise ValueError("max_passage_tokens must be at least 1")
        if window not in ("best", "start"):
            raise ValueError(f"window must be 'best' or 'start', not {window!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_passage_tokens = max_passage_tokens
        self.window = window
        self.segmenter = segmenter
        self.batch_tokens = batch_tokens
        self.head = output_head(model)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._lock = shared_lock(model)
        #: The model's thread governor, shared with its encoders (see ``shared_governor``).
        self.threads = shared_governor(model)
        self._bos = special_token_template(tokenizer)[0]
        self._before = tokenizer(PROMPT_BEFORE, add_special_tokens=False)["input_ids"]
        self._after = tokenizer(PROMPT_AFTER, add_special_tokens=False)["input_ids"]
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def cuts_query(self, query: str) -> bool:
        """Whether only the first `MAX_QUERY_TOKENS` tokens of ``query`` are scored (a token
        is at least a byte, so a short query is not tokenised to tell)."""
        return (len(query.encode("utf-8", "surrogatepass")) > MAX_QUERY_TOKENS
                and len(self.tokenizer(query, add_special_tokens=False)["input_ids"]) > MAX_QUERY_TOKENS)

    def score(self, query: str, passages: Sequence[str]) -> list[ScoredPassage]:
        """Each passage's query likelihood, in the order given (of the query's first
        `MAX_QUERY_TOKENS` tokens). An empty query scores 0."""
        query_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"][:MAX_QUERY_TOKENS]
        if not passages:
            return []
        if self.window == "best":
            passages = best_windows(query, passages, self.max_passage_tokens, self._count_tokens, self._sentence_starts)
        bodies = [ids[: self.max_passage_tokens] for ids in self._token_ids(list(passages))]
        contexts = [self._bos + self._before + body + self._after for body in bodies]
        if not query_ids:
            return [ScoredPassage(0.0, len(body)) for body in bodies]
        scores: list[float] = [math.nan] * len(contexts)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        for batch in self._batches(order, contexts, len(query_ids)):
            for i, value in zip(batch, self._score_batch([contexts[i] for i in batch], query_ids), strict=True):
                scores[i] = value
        return [ScoredPassage(s, len(body)) for s, body in zip(scores, bodies, strict=True)]

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []

    def _count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self._token_ids(texts)]

    def _sentence_starts(self, texts: list[str]) -> list[list[int]]:
        return sentence_starts(texts, self.segmenter)  # type: ignore[arg-type]

    def _batches(self, order: list[int], contexts: list[list[int]], query_len: int) -> list[list[int]]:
        """Indices in length order, grouped so that a padded batch stays within batch_tokens."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = len(contexts[i]) + query_len  # sorted: the newest is the longest
            if current and longest * (len(current) + 1) > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _score_batch(self, contexts: list[list[int]], query_ids: list[int]) -> list[float]:
        rows = [c + query_ids for c in contexts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        device = self.head.device
        # No padding mask: the padding is on the right, where a causal decoder's real positions
        # never look, and its own outputs are never read. Without a mask the pass takes the
        # plain causal attention kernel.
        passes = self.threads.forward_pass(ids.numel()) if device.type == "cpu" else contextlib.nullcontext()
        with self._lock, passes, torch.inference_mode():
            hidden = self.model(input_ids=ids.to(device), use_cache=False).last_hidden_state
        # The output head runs outside the lock (it changes nothing), once for the whole batch:
        # its 262k x 640 matrix is read once instead of once per passage.
        with torch.inference_mode():
            n = len(query_ids)
            # The state before each query token predicts it.
            states = torch.cat([hidden[r, len(context) - 1 : len(context) - 1 + n] for r, context in enumerate(contexts)])
            logits = states @ self.head.T
            target = torch.tensor(query_ids, device=device).repeat(len(contexts))[:, None]
            log_probs = []
            for rows, wanted in zip(logits.split(LOGIT_ROWS), target.split(LOGIT_ROWS), strict=True):
                rows = rows.float()
                if self.softcap:
                    rows = torch.tanh(rows / self.softcap) * self.softcap
                log_probs.append(rows.gather(1, wanted).squeeze(1) - torch.logsumexp(rows, dim=-1))
            return torch.cat(log_probs).view(len(contexts), n).mean(dim=1).tolist()


def blend_scores(retrieval: Sequence[float | None], likelihood: Sequence[float], weight: float) -> list[float]:
    """``(1 - weight) * z(retrieval) + weight * z(likelihood)`` over one query's candidates.

    Both sides are standardised over the candidates, so the blend means the same for cosine
    scores (dense), BM25 scores (sparse) and fused scores (hybrid). A candidate without a
    retrieval score counts as the average; a side whose scores are all equal adds nothing.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the reranker's weight must be within 0..1, not {weight}")
    if len(retrieval) != len(likelihood):
        raise ValueError("one retrieval score per likelihood")
    known = [s for s in retrieval if s is not None]
    fill = sum(known) / len(known) if known else 0.0
    ret = _standardised([fill if s is None else float(s) for s in retrieval])
    lik = _standardised([float(s) for s in likelihood])
    return [(1.0 - weight) * r + weight * q for r, q in zip(ret, lik, strict=True)]


def _standardised(values: list[float]) -> list[float]:
    if not values:
        return []
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    if spread < 1e-12:
        return [0.0] * len(values)
    return [(v - mean) / spread for v in values]


def output_head(model: torch.nn.Module) -> torch.Tensor:
    """The matrix that turns the last hidden states into vocabulary logits.

    The encoder loads the decoder without its LM head; for models that tie the head to the
    input embeddings (Gemma 3, SmolLM2 and most small decoders) that matrix is still there.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        name = getattr(config, "_name_or_path", None) or type(model).__name__
        raise RerankUnavailableError(
            f"{name} has an output head separate from its input embeddings, which the encoder does "
            "not load; reranking needs a model with tied embeddings (e.g. gemma3-270m)"
        )
    return model.get_input_embeddings().weight

