"""HTPEncoder: text in, L2-normalised float32 vectors out.

The chain reads like a sentence-transformers pipeline: segment -> lay out tokens and
placeholders -> forward with rewiring hooks and early exit -> pool -> normalise. Every method
(htp and its baselines) goes through the same code; what differs is asked of the method's
strategy object (``htp_embed.methods``), never of its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from htp_embed import query_widths
from htp_embed.attention import AttentionDecision, cpu_attention_decision
from htp_embed.config import EncoderConfig, EncoderSettingError
from htp_embed.gemma3_native import NativeGemma3
from htp_embed.identity import EncoderIdentity, config_from_identity
from htp_embed.layer_defaults import layer_defaults
from htp_embed.layout import PLACEHOLDERS, Layout, LayoutBuilder
from htp_embed.layout import sentence_index_per_token as _sentence_index
from htp_embed.methods import EncodingMethod, method_for
from htp_embed.models import (
    _dtype_name,
    decoder_layers,
    default_cache_dir,
    load_model,
    mean_input_embedding,
    native_requested,
    resolve_device,
    resolve_dtype,
    resolve_dtype_decision,
    runs_own_forward_pass,
)
from htp_embed.packed_linear import PackingDecision, cpu_packing_decision, pack_linear_layers
from htp_embed.pooling import at_positions, l2_normalise, masked_mean
from htp_embed.precision import DtypeDecision
from htp_embed.prefix_cache import NativePrefixCache, PrefixCache, TransformersPrefixCache
from htp_embed.query_widths import SHORT_WIDTH, bucketed_width, padded_width
from htp_embed.rewiring import EarlyExit, rewired
from htp_embed.segment import preload_segmenter, sentence_starts
from htp_embed.text_ahead import TEMPLATE_PROBE
from htp_embed.threads import ThreadGovernor

__all__ = ["EmptyTextError", "Encoded", "EncoderStats", "HTPEncoder", "config_from_identity"]

log = logging.getLogger(__name__)

# A token covers at most this many characters in any tokenizer we support, so cutting a text at
# max_length * CHARS_PER_TOKEN_BOUND characters loses nothing the window could hold, and keeps
# tokenising and segmenting a 50 MB document cheap.
CHARS_PER_TOKEN_BOUND = 32
# On the CPU, a batch ends before a text that would be padded by more than this share of the
# batch's width (see HTPEncoder._batch_length).
CPU_PADDING_TOLERANCE = 0.1
# Short texts (queries, pseudo-queries) are batched by tokens, not only by count: a batch may
# hold batch_size x SHORT_BATCH_WIDTH positions. A forward pass over a few dozen positions
# costs mostly reading the weights, once per pass, so 32 pseudo-queries of ~30 tokens in one
# pass instead of four ran 1.5x faster (bfloat16, 2 cores); long texts keep batch_size.
SHORT_BATCH_WIDTH = 128
# The least cosine between a query's vector with its prefix reused and without, for the reuse
# to be kept: the bar bfloat16 itself must meet against float32 (in float32 the two passes
# agree to ~1e-7; in bfloat16 to 0.9998-0.99999, as do plain passes over different batches).
PREFIX_AGREEMENT = 0.999


class NonFiniteVectorsError(ValueError):
    """The decoder's hidden states overflowed: no vector is returned rather than NaNs."""


class EmptyTextError(ValueError):
    """A text is empty or whitespace-only: there is nothing to embed."""


@dataclass
class EncoderStats:
    """Running totals over an encoder's life, for monitoring and benchmarks.

    Threads sharing an encoder (the HTTP service) all add to them, so a difference of two
    readings is not one caller's work: pipelines take their numbers from
    :meth:`HTPEncoder.encode_with_stats` instead.
    """

    texts: int = 0
    tokens: int = 0
    truncated: int = 0


@dataclass(frozen=True, eq=False)
class Encoded:
    """The vectors of one :meth:`HTPEncoder.encode_with_stats` call and what it cost.

    ``tokens`` counts the text tokens embedded (pooled positions, after truncation);
    ``truncated`` the texts cut to fit ``max_length``.
    """

    vectors: np.ndarray  # float32 [texts, dim], L2-normalised
    texts: int
    tokens: int
    truncated: int


@dataclass
class _Batch:
    ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    placeholder: torch.Tensor
    pool: torch.Tensor
    readout: torch.Tensor
    src: torch.Tensor | None
    dst: torch.Tensor | None


class HTPEncoder:
    """Embeds texts with Hierarchical Token Prepending (or a baseline) over a decoder LLM.

    >>> encoder = HTPEncoder()                       # offline default model, method="htp"
    >>> docs = encoder.encode_documents(["A text.", "Another one."])
    >>> query = encoder.encode_queries(["what text?"])
    >>> vanilla = encoder.with_method("vanilla")    # same weights, loaded once
    """

    def __init__(
        self,
        config: EncoderConfig | None = None,
        *,
        decoder: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        past_positions_ok: bool = False,
        **overrides: Any,
    ):
        """Load ``config.model`` (or use an already loaded ``decoder`` and ``tokenizer``);
        keyword ``overrides`` update single settings, e.g. ``HTPEncoder(method="vanilla")``.
        ``past_positions_ok``: a ``max_length`` past the model's positions loads with a warning
        instead of being refused (an index's recorded encoder, to embed its queries, which never
        come near the window: an older htp-index took such a max_length)."""
        config = config or EncoderConfig()
        if overrides:
            config = EncoderConfig(**{**config.model_dump(), **overrides})
        self.config = config
        self.method: EncodingMethod = method_for(config.method)
        self.device = resolve_device(config.device)
        if decoder is not None and config.dtype == "auto":
            # The caller chose the weights' precision when loading them; keep it.
            self.dtype = next(decoder.parameters()).dtype
            self.dtype_decision = DtypeDecision(_dtype_name(self.dtype), "the passed decoder's", source="explicit")
        else:
            own_pass = runs_own_forward_pass(str(config.model), self.device, config.implementation)
            self.dtype_decision = resolve_dtype_decision(
                config.dtype, self.device, model=config.model, cache_dir=config.cache_dir,
                attention_kernel=config.attention_kernel if own_pass else None,
            )
            self.dtype = getattr(torch, self.dtype_decision.dtype)
        if (decoder is None) != (tokenizer is None):
            # One without the other used to load config.model and drop the one passed, silently.
            raise ValueError("pass a decoder together with its tokenizer (or neither, to load config.model)")
        model = decoder
        if model is None or tokenizer is None:
            if self.method.needs_sentences:
                preload_segmenter(config.segmenter)  # overlaps spaCy's load with the model's
            model, tokenizer = _load_shared(config, self.dtype, self.device)
        model = model.to(device=self.device, dtype=self.dtype).eval()
        _check_max_length(config, model, refuse=not past_positions_ok)
        self.model = model
        self.tokenizer = tokenizer
        #: Whether the decoder's Linear weights run packed (None: a caller's decoder, or not a CPU).
        self.packing: PackingDecision | None = getattr(model, "_htp_packing", None)
        #: Which attention kernel the own forward pass runs (None: transformers' class, a caller's
        #: decoder, or not a CPU).
        self.attention: AttentionDecision | None = getattr(model, "_htp_attention", None)
        self.stats = EncoderStats()
        self._stats_lock = threading.Lock()
        self._layers = decoder_layers(model)
        self._lock = shared_lock(model)
        #: All of torch's threads per forward pass, or one while that measured faster (shared by
        #: everything that runs this model, as its lock is).
        self.threads = shared_governor(model)
        self._placeholder_vector = mean_input_embedding(model)
        self._template = special_token_template(tokenizer)
        self.sink_token = _sink_token(tokenizer, self._template[0], config.attention_sink, self.method)
        prefix = ([self.sink_token] if self.sink_token is not None else []) + self._template[0]
        self._builder = LayoutBuilder(prefix, self._template[1], config.max_length, self.tokenize)
        # Tokenised once: every query is laid out behind the same instruction (read-only).
        self._instruction_ids = self.tokenize(config.query_instruction) if config.query_instruction else []
        self._resolve_layers()
        # Not for models whose attention looks ahead (e.g. EmbeddingGemma's bidirectional
        # configs): there a prefix's states depend on what follows it.
        causal = not getattr(model.config, "use_bidirectional_attention", False)
        #: htp-index's own forward pass (htp_embed.gemma3_native) rather than transformers' with hooks.
        self.native = isinstance(model, NativeGemma3)
        self._prefix_cache: PrefixCache | None = None
        if causal and self.native:
            self._prefix_cache = NativePrefixCache(model, self.exit_after)
        elif causal:
            self._prefix_cache = TransformersPrefixCache(model, self._layers, self.exit_after,
                                                         model.get_input_embeddings())

    # ----------------------------------------------------------------- configuration
    def _resolve_layers(self) -> None:
        n = len(self._layers)
        defaults = layer_defaults(self.model.config.model_type)
        exit_layer = defaults.exit_layer if self.config.exit_layer == "default" else self.config.exit_layer
        if exit_layer is None:
            self.exit_after: int | None = None
            depth = n
        else:
            depth = exit_layer if exit_layer > 0 else n + 1 + exit_layer
            if not 1 <= depth <= n:
                raise EncoderSettingError(f"exit_layer={exit_layer} is outside 1..{n} (or -{n}..-1): "
                                          f"{self.config.model} has {n} layers")
            self.exit_after = depth - 1
        start = defaults.rewire_start if self.config.rewire_start is None else self.config.rewire_start
        stop = defaults.rewire_stop if self.config.rewire_stop is None else self.config.rewire_stop
        # Layers past the exit never run, so rewiring them is meaningless.
        self.rewire_layers = range(min(start, depth), min(stop, depth))
        self.exit_depth = depth if exit_layer is not None else None

    def with_method(self, method: str, **overrides: Any) -> HTPEncoder:
        """A sibling encoder sharing this one's weights, for side-by-side measurement.

        Overriding ``dtype`` or ``device``, or what is loaded and how (``model``, ``cache_dir``,
        ``implementation``, ``packed_linear``, ``attention_kernel``), loads the weights again
        instead: converting shared weights in place would change this encoder too, and sharing
        them would report another model's name over these weights.
        """
        config = EncoderConfig(**{**self.config.model_dump(), "method": method, **overrides})
        device = resolve_device(config.device)
        reloads = ("model", "cache_dir", "implementation", "packed_linear", "attention_kernel")
        if (device != self.device or (config.dtype != "auto" and resolve_dtype(config.dtype, device) != self.dtype)
                or any(getattr(config, name) != getattr(self.config, name) for name in reloads)):
            return HTPEncoder(config)
        return HTPEncoder(config, decoder=self.model, tokenizer=self.tokenizer)

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        return int(self.model.config.hidden_size)

    @property
    def model_name(self) -> str:
        """The configured model name."""
        return str(self.config.model)

    @property
    def placeholder_budget(self) -> int:
        """Window positions a document (no query instruction) may lose to anything but its text.

        Template special tokens, the sink token, and the method's own slots: HTP's two per
        block (``k.max_blocks`` blocks under adaptive K; fixed K is budgeted for 16), TP's one,
        PromptEOL's prompt, and for echo its prompts plus the second copy of the text.
        """
        return self.config.max_length - self.text_budget

    @property
    def text_budget(self) -> int:
        """Tokens of document text that fit one window untruncated: what a chunk may hold."""
        return self._text_room(0)

    @property
    def query_text_budget(self) -> int:
        """Tokens of query text that fit one window untruncated (the instruction takes room too)."""
        return self._text_room(len(self._instruction_ids))

    def _text_room(self, instruction: int) -> int:
        builder = self._builder
        window = self.config.max_length - len(builder.prefix) - len(builder.suffix) - instruction
        return max(self.method.text_room(window, builder, self.config), 0)

    def max_length_for(self, text_tokens: int) -> int:
        """The smallest ``max_length`` whose window holds ``text_tokens`` tokens of document
        text with this method's placeholders and template (:attr:`text_budget` is clamped at
        0, so a shortfall taken from it was short by the room the window lacks below that)."""
        builder = self._builder
        window = text_tokens  # no method holds more text than its window
        while self.method.text_room(window, builder, self.config) < text_tokens:
            window += 1
        return window + len(builder.prefix) + len(builder.suffix)

    def may_truncate_query(self, text: str) -> bool:
        """False when ``text`` is surely not cut as a query, from its length alone (no work for
        the usual query): a token covers at least one UTF-8 byte (a tokenizer's dummy prefix
        space may add one token), so fewer bytes than :attr:`query_text_budget` always fit."""
        return len(text.encode("utf-8", "surrogatepass")) >= self.query_text_budget

    def truncates_query(self, text: str) -> bool:
        """Whether embedding ``text`` as a query cuts it to fit ``max_length``: its vector then
        stands for its beginning only. A text :meth:`may_truncate_query` clears costs nothing;
        a longer one is tokenised, and laid out only when it has more tokens than the budget."""
        if not self.may_truncate_query(text) or len(self.tokenize(text)) <= self.query_text_budget:
            return False
        return self.layouts([text], is_query=True)[0].truncated

    def encoder_identity(self) -> EncoderIdentity:
        """Everything that decides the vectors, typed; see :meth:`identity` for the record."""
        config = self.config
        # Every optional field a method may record; the method picks the ones that concern it.
        optional: dict[str, Any] = {
            "rewire": (self.rewire_layers.start, self.rewire_layers.stop),
            "attention_sink": self.sink_token,
            "k": str(config.k),
            "segmenter": config.segmenter,
            "global_tokens": config.global_tokens,
            "local_tokens": config.local_tokens,
        }
        return EncoderIdentity(
            model=config.model,
            model_fingerprint=_model_fingerprint(self.model, config.cache_dir),
            method=config.method,
            dim=self.dim,
            exit_layer=self.exit_depth,
            max_length=config.max_length,
            query_instruction=config.query_instruction,
            **{key: optional[key] for key in self.method.identity_fields},
        )

    def identity(self) -> dict[str, Any]:
        """Everything that decides the vectors; an index built with one identity refuses others.

        The dict index manifests store; :func:`config_from_identity` turns it back into this
        encoder's configuration, and :func:`indexes.same_encoder` compares two.
        """
        return self.encoder_identity().record()

    def describe(self) -> str:
        """A short human-readable name, e.g. ``gemma3-270m/htp[k=adaptive:8,rewire=1-7,exit=13]``."""
        parts = [
            *self.method.describe_parts(self.config, self.rewire_layers),
            f"exit={self.exit_depth if self.exit_depth else 'full'}",
        ]
        if self.sink_token is not None:
            parts.append("sink")
        return f"{self.config.model}/{self.config.method}[{','.join(parts)}]"

    # ----------------------------------------------------------------- tokens
    def tokenize(self, text: str) -> list[int]:
        """The text's token ids as the layouts use them: no special tokens added, and special
        tokens typed in the text (a literal "<bos>") tokenised as text."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def count_tokens(self, text: str) -> int:
        """How many tokens :meth:`tokenize` makes of ``text`` (for sizing chunks)."""
        return len(self.tokenize(text))

    # ----------------------------------------------------------------- public encoding
    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Embed documents (no instruction). Returns float32 [n, dim], L2-normalised."""
        return self.encode(texts, is_query=False)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed queries with the query instruction. Returns float32 [n, dim], L2-normalised."""
        return self.encode(texts, is_query=True)

    def warm_query_widths(self, up_to: int = SHORT_WIDTH) -> int:
        """Embed one made-up query at each padded query width up to ``up_to`` positions.

        Why: on the CPU the first query at a new width pays for compiling its kernels (~7 ms),
        so a service that has just started answers its first queries slower than the rest. A
        long-running process calls this once; it costs ~30 ms a width. Nothing runs off the
        CPU or with padding switched off. Returns how many widths were run.
        """
        if self.device.type != "cpu" or not query_widths.ENABLED:
            return 0
        texts = [" ".join(["word"] * words) for words in range(1, up_to + 1)]
        warmed: set[int] = set()
        for layout in self.layouts(texts, is_query=True):
            cache = self._prefix_cache
            width = bucketed_width(len(layout) - (cache.usable([layout]) if cache is not None else 0))
            if width <= up_to and width not in warmed:
                self._embed_layouts([layout], is_query=True)
                warmed.add(width)
        return len(warmed)

    def encode(self, texts: Sequence[str], *, is_query: bool = False) -> np.ndarray:
        """Embed ``texts``; the caller's order is kept although batches are length-sorted."""
        return self.encode_with_stats(texts, is_query=is_query).vectors

    def encode_with_stats(self, texts: Sequence[str], *, is_query: bool = False,
                          on_batch: Callable[[int], None] | None = None) -> Encoded:
        """Embed ``texts`` like :meth:`encode`, with this call's token and truncation counts;
        ``on_batch`` is told how many texts each forward pass embedded (a caller's progress bar:
        one long document's nodes are one call, which held a bar at 0 for minutes).

        Safe for threads sharing the encoder: the counts are this call's alone.
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a list of texts, not a single string")
        texts = list(texts)
        if not texts:
            return Encoded(np.zeros((0, self.dim), dtype=np.float32), 0, 0, 0)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, not str")
            if not text.strip():
                raise EmptyTextError(f"text {i} is empty or whitespace-only; there is nothing to embed")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # the tokenizer's own word was a bare TypeError
                raise ValueError(
                    f"text {i} holds a lone surrogate ({ascii(text[exc.start])}) at character "
                    f"{exc.start}, which is not a character; pass valid UTF-8 text"
                ) from None
        layouts = self.layouts(texts, is_query=is_query)
        truncated = sum(layout.truncated for layout in layouts)
        if truncated:
            log.warning(
                "%d of %d %s exceeded max_length=%d tokens and were truncated (%s)",
                truncated, len(texts), "queries" if is_query else "texts", self.config.max_length,
                "their vectors stand for their beginning only" if is_query
                else "split long documents into chunks before embedding",
            )
        order = sorted(range(len(layouts)), key=lambda i: -len(layouts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        batch_size = self.config.batch_size
        bar = tqdm(
            total=len(texts), desc=f"embedding ({self.config.method})", unit="text",
            disable=not self.config.show_progress or len(texts) <= batch_size, leave=False,
        )
        position = 0
        budget = batch_size * SHORT_BATCH_WIDTH
        with bar:
            while position < len(order):
                count = self._batch_length(layouts, order, position, batch_size, budget)
                chunk = order[position : position + count]
                try:
                    vectors = self._embed_layouts([layouts[i] for i in chunk], is_query=is_query)
                except torch.OutOfMemoryError:
                    if count == 1:
                        raise
                    budget = 0  # from now on by count only, halving until it fits
                    batch_size = max(1, min(batch_size, count) // 2)
                    log.warning("out of memory; retrying with batch size %d", batch_size)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                out[chunk] = vectors
                position += len(chunk)
                bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(len(chunk))
        encoded = Encoded(out, len(texts), sum(len(layout.pool) for layout in layouts), truncated)
        with self._stats_lock:
            self.stats.texts += encoded.texts
            self.stats.tokens += encoded.tokens
            self.stats.truncated += encoded.truncated
        return encoded

    def _batch_length(
        self, layouts: list[Layout], order: list[int], position: int, batch_size: int, budget: int = 0
    ) -> int:
        """How many texts from ``order[position:]`` (longest first) go into the next batch.

        At most ``batch_size`` texts, or as many as fit ``budget`` positions when that is more
        (short texts: see ``SHORT_BATCH_WIDTH``). On the CPU every padded position costs as
        much as a real one, and bigger batches of long texts buy little, so a batch also ends
        where the next text would be padded by more than ``CPU_PADDING_TOLERANCE`` of the batch
        width (SciFact, batch 8: 13% of positions were padding, and batches of 4 ran 1.13x
        faster than 8).
        """
        width = len(layouts[order[position]])
        end = min(position + max(batch_size, budget // max(width, 1)), len(order))
        if self.device.type != "cpu":
            return end - position
        count = 1
        while position + count < end and len(layouts[order[position + count]]) >= width * (1 - CPU_PADDING_TOLERANCE):
            count += 1
        return count

    # ----------------------------------------------------------------- layouts
    def _tokenize_texts(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None, list[str]]:
        limit = self.config.max_length * CHARS_PER_TOKEN_BOUND
        clipped = [t if len(t) <= limit else t[:limit] for t in texts]
        need_offsets = self.method.needs_sentences
        encoded = self.tokenizer(
            clipped, add_special_tokens=False, split_special_tokens=True,
            return_offsets_mapping=need_offsets,
        )
        offsets = encoded["offset_mapping"] if need_offsets else None
        return [list(ids) for ids in encoded["input_ids"]], offsets, clipped

    def layouts(self, texts: Sequence[str], *, is_query: bool = False) -> list[Layout]:
        """The token layout of each text under this encoder's method (no model call)."""
        texts = list(texts)
        token_ids, offsets, clipped = self._tokenize_texts(texts)
        instruction = self._instruction_ids if is_query else []
        sentences: list[list[int] | None] = [None] * len(texts)
        if offsets is not None:
            starts = sentence_starts(clipped, self.config.segmenter)
            sentences = [_sentence_index(offs, s) for offs, s in zip(offsets, starts, strict=True)]
        layouts = [
            self.method.layout(self._builder, ids, instruction, self.config, sentence_of_token)
            for ids, sentence_of_token in zip(token_ids, sentences, strict=True)
        ]
        for layout, text, clip in zip(layouts, texts, clipped, strict=True):
            layout.truncated = layout.truncated or len(clip) < len(text)
        return layouts

    # ----------------------------------------------------------------- forward
    def _collate(self, layouts: list[Layout], start: int = 0, width: int = 0) -> _Batch:
        """The batch's tensors, from position ``start`` of every layout on (the positions
        before it are a shared prefix whose keys and values come from the prefix cache), at
        least ``width`` positions wide."""
        if start:
            layouts = [layout.after(start) for layout in layouts]
        pad_left = getattr(self.tokenizer, "padding_side", "right") == "left"
        n, width = len(layouts), max(width, *(len(layout) for layout in layouts))
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        pool = torch.zeros((n, width), dtype=torch.float32)
        readout = torch.zeros(n, dtype=torch.long)
        n_copies = max(len(layout.copy_src) for layout in layouts)
        src = torch.zeros((n, n_copies), dtype=torch.long) if n_copies else None
        dst = torch.zeros((n, n_copies), dtype=torch.long) if n_copies else None
        for row, layout in enumerate(layouts):
            length = len(layout)
            offset = width - length if pad_left else 0
            ids[row, offset : offset + length] = torch.tensor(layout.ids)
            mask[row, offset : offset + length] = 1
            # Explicit positions: a left-padded text gets the same positions as when alone.
            positions[row, offset : offset + length] = torch.arange(start, start + length)
            pool[row, [offset + p for p in layout.pool]] = 1.0
            readout[row] = offset + layout.readout
            if src is not None and dst is not None:
                pairs = list(zip(layout.copy_src, layout.copy_dst, strict=True)) or [(0, 0)]
                # Padding repeats a real pair: writing the same value twice is harmless.
                pairs += [pairs[0]] * (n_copies - len(pairs))
                src[row] = torch.tensor([offset + s for s, _ in pairs])
                dst[row] = torch.tensor([offset + d for _, d in pairs])
        placeholder = torch.isin(ids, torch.tensor(PLACEHOLDERS))
        ids = ids.clamp_min(0)
        device = self.device
        return _Batch(
            ids.to(device), mask.to(device), positions.to(device), placeholder.to(device),
            pool.to(device), readout.to(device),
            src.to(device) if src is not None else None, dst.to(device) if dst is not None else None,
        )

    def _embed_layouts(self, layouts: list[Layout], *, is_query: bool = False) -> np.ndarray:
        cache = self._prefix_cache
        prefix = cache.usable(layouts) if cache is not None else 0
        if not prefix or (cache is not None and cache.verified):
            return self._forward(layouts, prefix, is_query=is_query)
        # First use: the pass that reuses the prefix must give the plain pass's vectors (a
        # model with bidirectional attention, or one that takes no cache, would not); kept
        # only if it does, checked once per encoder. Kept, its vectors are the answer: every
        # later query gets the reused pass's, and in bfloat16 the two differ in the last bits
        # (cosine ~0.999996), enough to swap a near-tie between a process's first query (a
        # one-shot `htp-index query`) and the same query asked of the service.
        plain = self._forward(layouts, 0, is_query=is_query)
        try:
            reused = self._forward(layouts, prefix, is_query=is_query)
            agreement = float(np.min(np.sum(plain * reused, axis=1)))
        except (TypeError, ValueError, AttributeError, RuntimeError, IndexError) as exc:
            agreement, reason = -1.0, f"{type(exc).__name__}: {exc}"
        else:
            reason = f"cosine {agreement:.6f} to the plain pass"
        if agreement >= PREFIX_AGREEMENT:
            assert cache is not None
            cache.verified = True
            return reused
        log.info("not reusing the query prefix's keys and values for %s (%s)", self.config.model, reason)
        self._prefix_cache = None
        return plain

    def _forward(self, layouts: list[Layout], prefix: int, *, is_query: bool = False) -> np.ndarray:
        """The vectors of one batch; the first ``prefix`` positions (shared by every layout)
        come from the prefix cache when ``prefix`` > 0. A few queries are padded to one of a
        few widths on the CPU (:mod:`htp_embed.query_widths`)."""
        width = padded_width(max(len(layout) for layout in layouts) - prefix, len(layouts),
                             is_query=is_query, on_cpu=self.device.type == "cpu")
        batch = self._collate(layouts, start=prefix, width=width)
        passes = self.threads.forward_pass(batch.ids.numel()) if self.device.type == "cpu" else contextlib.nullcontext()
        with self._lock, passes, torch.inference_mode():
            embeds = self.model.get_input_embeddings()(batch.ids)
            # Placeholders start as the mean token embedding; from the first rewired layer on
            # they hold block summaries.
            embeds = torch.where(
                batch.placeholder.unsqueeze(-1), self._placeholder_vector.to(embeds.dtype), embeds
            )
            attention_mask, prefix_state = batch.attention_mask, None
            if prefix:
                # The shared prefix's keys and values come from the cache; the mask covers them too.
                seen = torch.ones((len(layouts), prefix), dtype=attention_mask.dtype, device=attention_mask.device)
                attention_mask = torch.cat([seen, attention_mask], dim=1)
                assert self._prefix_cache is not None
                prefix_state = self._prefix_cache.for_batch(layouts[0].ids[:prefix], len(layouts), self.device)
            hidden = self._decoder_pass(embeds, attention_mask, batch, prefix_state)
            if self.method.readout == "last":
                vectors = at_positions(hidden, batch.readout)
            else:
                vectors = masked_mean(hidden, batch.pool)
            if not bool(torch.isfinite(vectors).all()):
                # float16 overflows in Gemma's middle layers: vectors of NaN used to come back
                # without a word (an index refuses them only when they are added).
                raise NonFiniteVectorsError(
                    f"{self.model_name} gave vectors with NaN or infinite values in "
                    f"{_dtype_name(self.dtype)} (its activations overflow); use dtype bfloat16 or float32"
                )
            return l2_normalise(vectors).cpu().numpy()

    def _decoder_pass(self, embeds: torch.Tensor, attention_mask: torch.Tensor, batch: _Batch,
                      prefix_state: object | None) -> torch.Tensor:
        """The hidden states at the exit layer, with HTP's copies before each rewired layer."""
        if self.native:
            hidden, _ = self.model.hidden_states(
                embeds, attention_mask, batch.position_ids, rewire=self.rewire_layers, src=batch.src,
                dst=batch.dst, exit_after=self.exit_after, prefix=prefix_state,  # type: ignore[arg-type]
            )
            return hidden
        cached: dict[str, Any] = {"use_cache": False}
        if prefix_state is not None:
            assert isinstance(self._prefix_cache, TransformersPrefixCache)
            cached = {"use_cache": True, self._prefix_cache.keyword: prefix_state}
        with rewired(self._layers, self.rewire_layers, batch.src, batch.dst, self.exit_after):
            try:
                output = self.model(
                    inputs_embeds=embeds, attention_mask=attention_mask, position_ids=batch.position_ids, **cached,
                )
                return output.last_hidden_state
            except EarlyExit as stop:
                return stop.hidden


class MaxLengthPastPositionsError(EncoderSettingError):
    """``max_length`` is more than the model's ``positions`` (its max_position_embeddings)."""

    def __init__(self, message: str, positions: int):
        super().__init__(message)
        self.positions = positions


def _check_max_length(config: EncoderConfig, model: torch.nn.Module, *, refuse: bool = True) -> None:
    """Refuse a ``max_length`` past the positions the model was trained on (its config's
    ``max_position_embeddings``, where it gives one): max_length 100000 on smollm2-135m (8192)
    split nodes of ~100k tokens and embedded them without a word, far outside what it learned.
    ``refuse=False`` logs it instead (see ``past_positions_ok``)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and config.max_length > positions:
        if not refuse:
            log.warning("max_length=%d is more than %s holds (max_position_embeddings %d): loaded to embed "
                        "queries, which never come near that many tokens", config.max_length, config.model, positions)
            return
        raise MaxLengthPastPositionsError(
            f"max_length={config.max_length} is more than {config.model} holds "
            f"(max_position_embeddings {positions}): use max_length <= {positions}", positions)


# --------------------------------------------------------------------- helpers
_LOCKS_GUARD = threading.Lock()
# Loaded decoders by (model, cache dir, dtype, device, files' stats), for as long as an encoder holds one: a
# process that opens several encoders on the same weights (an ingest then a query, a service
# reopening a new index version) loads them once.
_LOADED: weakref.WeakValueDictionary[tuple[str, ...], torch.nn.Module] = weakref.WeakValueDictionary()
_LOADING = threading.Lock()


def _load_shared(config: EncoderConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` for ``config.model``, reusing a live copy with the same dtype and device."""
    from htp_embed.fingerprint import checkpoint_key, definition_stats, remember_checkpoint

    # The files' stats are part of the key: weights saved again over a local model's
    # directory (a fine-tune) are loaded again, not served from the copy in memory.
    checkpoint = checkpoint_key(str(config.model))
    key = (str(config.model), str(config.cache_dir or ""), str(dtype), str(device), json.dumps(checkpoint),
           json.dumps(definition_stats(str(config.model))),
           config.packed_linear, config.implementation, config.attention_kernel)
    native = native_requested(device, config.implementation)
    with _LOADING:
        model = _LOADED.get(key)
        if model is None:
            model, tokenizer = load_model(config.model, dtype=dtype, cache_dir=config.cache_dir, native=native)
            model = model.to(device=device, dtype=dtype).eval()
            model._htp_tokenizer = tokenizer
            if device.type == "cpu" and config.packed_linear == "auto":
                model._htp_packing = _pack_if_faster(model, dtype, config.cache_dir)
            elif device.type == "cpu":
                model._htp_packing = PackingDecision(False, "packed_linear='off' in the encoder settings",
                                                     source="explicit")
            if isinstance(model, NativeGemma3) and device.type == "cpu":
                model._htp_attention = _choose_attention_kernel(model, dtype, config)
            remember_checkpoint(model, checkpoint)
            _LOADED[key] = model
        return model, model._htp_tokenizer


def _pack_if_faster(model: torch.nn.Module, dtype: torch.dtype, cache_dir: Path | None) -> PackingDecision:
    """Pack the decoder layers' Linear weights once where this CPU measured that faster
    (see :mod:`htp_embed.packed_linear`); the model we loaded ourselves, never a caller's."""
    config = getattr(model.config, "text_config", None) or model.config
    shape = (int(config.hidden_size), int(config.intermediate_size))
    decision = cpu_packing_decision(shape, dtype, cache_dir or default_cache_dir())
    if decision.pack and not pack_linear_layers(decoder_layers(model)):
        decision = dataclasses.replace(decision, pack=False, reason="packing refused at load (see the log)")
    return decision


def _choose_attention_kernel(model: NativeGemma3, dtype: torch.dtype, config: EncoderConfig) -> AttentionDecision:
    """Set the own forward pass's attention kernel: the settings' choice, or under "auto" the
    one this CPU measured faster (see :mod:`htp_embed.attention`)."""
    if config.attention_kernel != "auto":
        decision = AttentionDecision(config.attention_kernel, f"attention_kernel='{config.attention_kernel}' in the "
                                     "encoder settings", source="explicit")
    else:
        native = model.config
        layout = (int(native.num_attention_heads), int(native.num_key_value_heads), int(native.head_dim))
        decision = cpu_attention_decision(layout, dtype, config.cache_dir or default_cache_dir())
    model.attention_kernel = decision.kernel
    return decision


def shared_lock(model: torch.nn.Module) -> threading.Lock:
    """One lock per model: hooks are installed on the shared modules for each forward pass."""
    with _LOCKS_GUARD:
        lock = getattr(model, "_htp_forward_lock", None)
        if lock is None:
            lock = threading.Lock()
            model._htp_forward_lock = lock
        return lock


def shared_governor(model: torch.nn.Module) -> ThreadGovernor:
    """One thread governor per model: its passes run one at a time under :func:`shared_lock`,
    and what one encoder (or the reranker) learns of the machine holds for the others."""
    with _LOCKS_GUARD:
        governor = getattr(model, "_htp_thread_governor", None)
        if governor is None:
            governor = ThreadGovernor()
            model._htp_thread_governor = governor
        return governor


SINK_TOKEN_NAMES = ("<|endoftext|>",)


def _sink_token(tokenizer: Any, prefix: list[int], attention_sink: str, method: EncodingMethod) -> int | None:
    """The token put first when the model's template has no BOS and the method has placeholders.

    Decoders park surplus attention on the first position (the attention sink). Without a BOS
    that position is HTP's first <B-PST>, whose input rewiring overwrites on every rewired
    layer. On SmolLM2-135M this cost 15 NDCG@10 against vanilla at exit 29; with
    <|endoftext|> in front HTP gains +2.8 [+1.1, +4.6] over vanilla given the same prefix
    (benchmarks/results/quality/tables.md, "smollm2-135m ... pooled").
    """
    if attention_sink == "off" or prefix or not method.rewires:
        return None
    vocab = tokenizer.get_vocab()
    for name in SINK_TOKEN_NAMES:
        if name in vocab:
            return int(vocab[name])
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return None


def special_token_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer wraps around a text: e.g. ([<bos>], []) for Gemma."""
    plain = tokenizer(TEMPLATE_PROBE, add_special_tokens=False)["input_ids"]
    wrapped = tokenizer(TEMPLATE_PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return list(wrapped[:start]), list(wrapped[start + len(plain) :])
    return [], []


def _model_fingerprint(model: torch.nn.Module, cache_dir: Path | None) -> str:
    """The model's architecture *and* weights, independent of device and dtype, so an index
    built on a GPU in bf16 accepts queries embedded on a CPU in float32 by the same weights,
    and refuses those of other weights saved under the same name (see htp_embed.fingerprint).
    Its cache lives in the encoder's ``cache_dir``, beside the other measurements."""
    from htp_embed.fingerprint import model_fingerprint

    return model_fingerprint(model, cache_dir)
