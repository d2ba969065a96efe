"""Token layouts: where every token, placeholder and copy goes, for each method.

A layout is plain Python data built per text before any tensor exists, so every rule of the
method (placeholder positions, which tokens are pooled, what is copied where, truncation) can
be tested without running a model. Placeholders never go through the tokenizer: they are
reserved ids beyond its vocabulary, so a literal "<PST>" typed in a text stays text.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PST = -1  # local summary slot, before each block
BPST = -2  # global summary slot, at the front of the text
PLACEHOLDERS = (PST, BPST)

ECHO_FIRST = "Rewrite the passage: "
ECHO_SECOND = "\nRewritten passage: "
PROMPTEOL_OPEN = 'This sentence: "'
PROMPTEOL_CLOSE = '" means in one word: "'


@dataclass
class Layout:
    """One sequence ready to batch.

    ``copy_src``/``copy_dst`` are parallel: before each rewired layer the hidden state at
    ``copy_src[i]`` is copied to ``copy_dst[i]``. ``pool`` lists the positions mean-pooled,
    ``readout`` the position read by last-token methods.
    """

    ids: list[int]
    pool: list[int]
    readout: int
    copy_src: list[int] = field(default_factory=list)
    copy_dst: list[int] = field(default_factory=list)
    n_blocks: int = 0
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def after(self, start: int) -> Layout:
        """This layout without its first ``start`` positions (a prefix computed elsewhere),
        every position renumbered from the cut."""
        return Layout(
            ids=self.ids[start:], pool=[p - start for p in self.pool], readout=self.readout - start,
            copy_src=[p - start for p in self.copy_src], copy_dst=[p - start for p in self.copy_dst],
            n_blocks=self.n_blocks, truncated=self.truncated,
        )


@dataclass(frozen=True)
class TokenizedText:
    """A text's tokens (no special tokens) and, per token, the index of its sentence."""

    ids: list[int]
    sentence_of_token: list[int]


def sentence_index_per_token(offsets: Sequence[tuple[int, int]], starts: Sequence[int]) -> list[int]:
    """Map each token to the sentence holding its last character.

    Using the last character puts a leading-space token (" Second") in the sentence it opens.
    """
    return [max(bisect_right(starts, max(end - 1, begin)) - 1, 0) for begin, end in offsets]


def blocks_of(text: TokenizedText, k: int) -> list[list[int]]:
    """Group the token ids into blocks of ``k`` consecutive sentences (empty blocks dropped)."""
    blocks: list[list[int]] = []
    current = -1
    for token, sentence in zip(text.ids, text.sentence_of_token, strict=True):
        block = sentence // k
        if block != current:
            blocks.append([])
            current = block
        blocks[-1].append(token)
    return blocks


class LayoutBuilder:
    """Builds :class:`Layout`s for one tokenizer's template (prefix/suffix special tokens)."""

    def __init__(self, prefix: list[int], suffix: list[int], max_length: int, tokenize: Callable[[str], list[int]]):
        self.prefix = prefix
        self.suffix = suffix
        self.max_length = max_length
        self.tokenize = tokenize  # str -> list[int], no special tokens, specials kept as text

    def _fixed(self, *parts: list[int]) -> int:
        return len(self.prefix) + len(self.suffix) + sum(len(p) for p in parts)

    def _budget(self, *parts: list[int]) -> int:
        budget = self.max_length - self._fixed(*parts)
        if budget < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for text after the template "
                f"({self._fixed(*parts)} tokens)"
            )
        return budget

    def plain(self, text: list[int], instruction: list[int]) -> Layout:
        """vanilla / last: template + text; pool the text, read out the last token."""
        budget = self._budget(instruction)
        kept = text[:budget]
        head = self.prefix + instruction
        ids = head + kept + self.suffix
        pool = list(range(len(head), len(head) + len(kept)))
        return Layout(ids, pool, len(ids) - 1, truncated=len(kept) < len(text))

    def echo(self, text: list[int], instruction: list[int]) -> Layout:
        """Echo: the text twice; pool over the second copy, which has seen the whole text."""
        first, second = self.tokenize(ECHO_FIRST), self.tokenize(ECHO_SECOND)
        budget = self._budget(instruction, first, second) // 2
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} is too small for echo embeddings")
        kept = text[:budget]
        head = self.prefix + instruction + first + kept + second
        ids = head + kept + self.suffix
        pool = list(range(len(head), len(head) + len(kept)))
        return Layout(ids, pool, len(ids) - 1, truncated=len(kept) < len(text))

    def prompteol(self, text: list[int], instruction: list[int]) -> Layout:
        """PromptEOL: 'This sentence: "…" means in one word: "' and read the last token."""
        opening, closing = self.tokenize(PROMPTEOL_OPEN), self.tokenize(PROMPTEOL_CLOSE)
        budget = self._budget(opening, instruction, closing)
        kept = text[:budget]
        head = self.prefix + opening + instruction
        ids = head + kept + closing
        pool = list(range(len(head), len(head) + len(kept)))
        return Layout(ids, pool, len(ids) - 1, truncated=len(kept) < len(text))

    def token_prepending(self, text: list[int], instruction: list[int]) -> Layout:
        """TP: one <PST> before the text, fed from the sequence's last token; mean-pooled."""
        budget = self._budget(instruction, [PST])
        kept = text[:budget]
        head = self.prefix + instruction + [PST]
        ids = head + kept + self.suffix
        pool = list(range(len(head), len(head) + len(kept)))
        return Layout(
            ids, pool, len(ids) - 1, copy_src=[len(ids) - 1], copy_dst=[len(head) - 1],
            n_blocks=1, truncated=len(kept) < len(text),
        )

    def htp(
        self,
        blocks: list[list[int]],
        instruction: list[int],
        *,
        local_tokens: bool = True,
        global_tokens: bool = True,
    ) -> Layout:
        """HTP: M <B-PST> after the template prefix, a <PST> before each block.

        Placeholders are budgeted before truncation: blocks are kept while they fit with
        their two slots, the last one possibly cut, so no sequence exceeds ``max_length``.
        """
        slots_per_block = int(local_tokens) + int(global_tokens)
        budget = self._budget(instruction)
        kept: list[list[int]] = []
        total = sum(len(b) for b in blocks)
        for block in blocks:
            room = budget - slots_per_block
            if room < 1:
                break
            kept.append(block[:room])
            budget -= slots_per_block + len(kept[-1])
        n_kept_tokens = sum(len(b) for b in kept)
        m = len(kept)

        head = self.prefix + instruction + ([BPST] * m if global_tokens else [])
        ids = list(head)
        pool: list[int] = []
        local_slot: list[int] = []
        block_end: list[int] = []
        for block in kept:
            if local_tokens:
                local_slot.append(len(ids))
                ids.append(PST)
            pool.extend(range(len(ids), len(ids) + len(block)))
            ids.extend(block)
            block_end.append(len(ids) - 1)
        ids.extend(self.suffix)
        if self.suffix and block_end:
            # As in the reference: the last block's summary is the template's closing token.
            block_end[-1] = len(ids) - 1

        src: list[int] = []
        dst: list[int] = []
        if local_tokens:
            src += block_end
            dst += local_slot
        if global_tokens:
            first_global = len(self.prefix) + len(instruction)
            src += block_end
            dst += [first_global + i for i in range(m)]
        return Layout(
            ids, pool, len(ids) - 1, copy_src=src, copy_dst=dst, n_blocks=m,
            truncated=n_kept_tokens < total,
        )
