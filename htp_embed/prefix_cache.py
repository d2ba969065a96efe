"""Reuse the decoder's work on the prefix every query shares: BOS and the query instruction.

A query's layout starts with the same tokens every time (``<bos>Retrieve relevant document.
Text: `` for the default encoder: 8 of a typical query's ~20 positions). Attention is causal
and nothing is rewired, pooled or read out there, so those positions' keys and values at
every layer do not depend on what follows. They are computed once per encoder and handed to
every later forward pass as a key/value cache, and the pass runs on the rest only.

On the CPU a short forward pass costs in proportion to its positions (the matrix products of a
few dozen rows run at the kernel's speed, not the memory's), so this cuts the model's share of
a query by about the prefix's share of its positions. The vectors are those of the full pass:
``tests/test_encoder_prefix_cache.py`` compares them for every method.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from htp_embed.gemma3_native import NativeGemma3, PrefixStates
from htp_embed.layout import Layout
from htp_embed.rewiring import EarlyExit, rewired

# Below this, the bookkeeping costs more than the positions saved (documents share only <bos>).
MIN_PREFIX = 4
# Longer batches keep the plain pass: a prefix saves little there, and sliding-window layers
# would have to drop cached positions.
MAX_WIDTH = 256
# Distinct prefixes kept per encoder (one per query instruction in practice).
MAX_ENTRIES = 4


def shared_prefix_length(layouts: Sequence[Layout]) -> int:
    """How many leading positions all ``layouts`` share that no later step treats specially.

    A position is shareable when every layout holds the same real token there (placeholders
    end the prefix) and no position before it is pooled, read out, or a rewiring source or
    target: then its states depend only on the tokens before it.
    """
    first = layouts[0].ids
    limit = min(
        min([*layout.pool, layout.readout, *layout.copy_src, *layout.copy_dst, len(layout.ids) - 1])
        for layout in layouts
    )
    length = 0
    while length < limit and first[length] >= 0 and all(layout.ids[length] == first[length] for layout in layouts):
        length += 1
    return length


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes a key/value cache: ``cache`` in current transformers,
    ``past_key_values`` before the rename."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class PrefixCache:
    """Keys and values of shared prefixes for one model and exit layer, computed on first use.

    What a stored prefix is and how a batch gets its own copy depends on the decoder: see
    :class:`TransformersPrefixCache` and :class:`NativePrefixCache`.
    """

    def __init__(self, exit_after: int | None):
        self._exit_after = exit_after
        self._entries: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self._guard = threading.Lock()
        #: Set by the encoder once a pass with the cache gave the plain pass's vectors.
        self.verified = False

    def usable(self, layouts: Sequence[Layout]) -> int:
        """The prefix length to reuse for this batch, or 0 for a plain forward pass."""
        if max(len(layout) for layout in layouts) > MAX_WIDTH:
            return 0
        length = shared_prefix_length(layouts)
        return length if length >= MIN_PREFIX else 0

    def for_batch(self, ids: Sequence[int], batch: int, device: torch.device) -> object:
        """A fresh cache holding the prefix ``ids``' keys and values, repeated ``batch`` times
        (the forward pass appends to it, so each pass gets its own copy)."""
        key = tuple(int(i) for i in ids)
        with self._guard:
            stored = self._entries.get(key)
            if stored is None:
                stored = self._compute(key, device)
                self._entries[key] = stored
                while len(self._entries) > MAX_ENTRIES:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
        return self._for_batch(stored, batch)

    def _compute(self, ids: tuple[int, ...], device: torch.device) -> object:
        raise NotImplementedError

    def _for_batch(self, stored: object, batch: int) -> object:
        raise NotImplementedError


class TransformersPrefixCache(PrefixCache):
    """For a transformers decoder: a ``DynamicCache`` passed to the model as its cache."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module], exit_after: int | None,
                 embed: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(exit_after)
        self._model = model
        self._layers = layers
        self._embed = embed
        self._keyword = _cache_keyword(model)

    @property
    def keyword(self) -> str:
        """The model's forward argument that takes the cache."""
        return self._keyword

    def _for_batch(self, stored: object, batch: int) -> object:
        cache = _fresh_copy(stored)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    @torch.inference_mode()
    def _compute(self, ids: tuple[int, ...], device: torch.device) -> object:
        from transformers import DynamicCache

        cache = DynamicCache(config=self._model.config)
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(len(ids), device=device).unsqueeze(0)
        # Stopped at the exit layer: the layers up to it have written their keys and values.
        with rewired(self._layers, range(0), None, None, self._exit_after), contextlib.suppress(EarlyExit):
            self._model(inputs_embeds=self._embed(tokens), attention_mask=torch.ones_like(tokens),
                        position_ids=positions, use_cache=True, **{self._keyword: cache})
        return cache


def _fresh_copy(stored: object) -> object:
    """A cache a forward pass may append to without touching ``stored``.

    The cache's layers grow by concatenation (``torch.cat`` makes new tensors; nothing is
    written in place), so new layer objects that point at the stored tensors are enough: a
    deep copy of the tensors cost ~1.7 ms of a ~35 ms query. A cache without a ``layers`` list
    (another transformers release) is deep-copied. ``tests/test_encoder_prefix_cache.py`` runs
    the same queries through the cache again and again against the plain pass.
    """
    layers = getattr(stored, "layers", None)
    if not isinstance(layers, list):
        return copy.deepcopy(stored)
    cache = copy.copy(stored)
    cache.layers = [copy.copy(layer) for layer in layers]
    return cache


class NativePrefixCache(PrefixCache):
    """For :class:`~htp_embed.gemma3_native.NativeGemma3`: each layer's keys and values as
    tensors of batch 1, which every batch reads (broadcast, never written): no copy per pass."""

    def __init__(self, model: NativeGemma3, exit_after: int | None):
        super().__init__(exit_after)
        self._model = model

    @torch.inference_mode()
    def _compute(self, ids: tuple[int, ...], device: torch.device) -> PrefixStates:
        return self._model.prefix_states(ids, self._exit_after)

    def _for_batch(self, stored: object, batch: int) -> object:
        return stored
