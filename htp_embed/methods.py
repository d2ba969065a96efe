"""What each embedding method does differently, carried by one small object per method.

HTP and its baselines share the whole encoder (tokenise -> lay out -> forward -> read out);
they differ only in a handful of answers: does the layout need sentences, does it have
placeholders to rewire, is the vector a mean or the last token, what settings decide its
vectors, and how many window positions it takes from the text. Asking the method object
instead of comparing ``config.method`` strings keeps every such rule in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from htp_embed.config import METHODS, EncoderConfig
from htp_embed.layout import (
    ECHO_FIRST,
    ECHO_SECOND,
    PROMPTEOL_CLOSE,
    PROMPTEOL_OPEN,
    Layout,
    LayoutBuilder,
    TokenizedText,
    blocks_of,
)

# HTP under a fixed K has no bound on its blocks; this many is what a window is budgeted for
# (the rule ingest has always sized its chunks by).
FIXED_K_BUDGETED_BLOCKS = 16

Readout = Literal["mean", "last"]


class EncodingMethod:
    """The defaults: plain mean pooling over template + text (the ``vanilla`` baseline)."""

    name: ClassVar[str] = "vanilla"
    #: The layout groups tokens by sentence, so texts need segmenting and token offsets.
    needs_sentences: ClassVar[bool] = False
    #: The layout has placeholders that rewiring fills; such a method wants an attention sink
    #: in front when the tokenizer adds no BOS (see ``encoder._sink_token``).
    rewires: ClassVar[bool] = False
    #: How a vector is read from the last hidden state.
    readout: ClassVar[Readout] = "mean"
    #: The optional :class:`~htp_embed.identity.EncoderIdentity` fields this method records,
    #: because they change its vectors (and only its).
    identity_fields: ClassVar[tuple[str, ...]] = ()

    def layout(
        self,
        builder: LayoutBuilder,
        ids: list[int],
        instruction: list[int],
        config: EncoderConfig,
        sentence_of_token: Sequence[int] | None = None,
    ) -> Layout:
        """The token layout of one text (``sentence_of_token`` only when ``needs_sentences``)."""
        return builder.plain(ids, instruction)

    def text_room(self, window: int, builder: LayoutBuilder, config: EncoderConfig) -> int:
        """Tokens of document text that fit in ``window`` positions left after the template."""
        return window

    def describe_parts(self, config: EncoderConfig, rewire: range) -> list[str]:
        """The settings shown before ``exit=`` in :meth:`HTPEncoder.describe`."""
        return []

    def __repr__(self) -> str:
        return f"<method {self.name}>"


class Vanilla(EncodingMethod):
    """Mean of the text tokens' hidden states."""


class LastToken(EncodingMethod):
    """The last token's hidden state."""

    name = "last"
    readout = "last"


class Echo(EncodingMethod):
    """The text twice; the mean over the second copy, which has seen the whole text."""

    name = "echo"

    def layout(
        self,
        builder: LayoutBuilder,
        ids: list[int],
        instruction: list[int],
        config: EncoderConfig,
        sentence_of_token: Sequence[int] | None = None,
    ) -> Layout:
        return builder.echo(ids, instruction)

    def text_room(self, window: int, builder: LayoutBuilder, config: EncoderConfig) -> int:
        prompts = len(builder.tokenize(ECHO_FIRST)) + len(builder.tokenize(ECHO_SECOND))
        return (window - prompts) // 2


class PromptEOL(EncodingMethod):
    """'This sentence: "…" means in one word: "' and the last token's hidden state."""

    name = "prompteol"
    readout = "last"

    def layout(
        self,
        builder: LayoutBuilder,
        ids: list[int],
        instruction: list[int],
        config: EncoderConfig,
        sentence_of_token: Sequence[int] | None = None,
    ) -> Layout:
        return builder.prompteol(ids, instruction)

    def text_room(self, window: int, builder: LayoutBuilder, config: EncoderConfig) -> int:
        return window - len(builder.tokenize(PROMPTEOL_OPEN)) - len(builder.tokenize(PROMPTEOL_CLOSE))


class TokenPrepending(EncodingMethod):
    """TP: one rewired <PST> in front of the text, mean pooled."""

    name = "tp"
    rewires = True
    identity_fields = ("rewire", "attention_sink")

    def layout(
        self,
        builder: LayoutBuilder,
        ids: list[int],
        instruction: list[int],
        config: EncoderConfig,
        sentence_of_token: Sequence[int] | None = None,
    ) -> Layout:
        return builder.token_prepending(ids, instruction)

    def text_room(self, window: int, builder: LayoutBuilder, config: EncoderConfig) -> int:
        return window - 1

    def describe_parts(self, config: EncoderConfig, rewire: range) -> list[str]:
        return [f"rewire={rewire.start}-{rewire.stop}"]


class HierarchicalTokenPrepending(TokenPrepending):
    """HTP: sentences grouped into K-sentence blocks, a <PST> before each and <B-PST>s in front."""

    name = "htp"
    needs_sentences = True
    identity_fields = ("rewire", "attention_sink", "k", "segmenter", "global_tokens", "local_tokens")

    def layout(
        self,
        builder: LayoutBuilder,
        ids: list[int],
        instruction: list[int],
        config: EncoderConfig,
        sentence_of_token: Sequence[int] | None = None,
    ) -> Layout:
        if sentence_of_token is None:
            raise ValueError("htp lays out sentences: pass each token's sentence index")
        tokenized = TokenizedText(ids, list(sentence_of_token))
        # K follows the sentences that fit the window: a long text cut to 512 tokens is laid
        # out like the text it has become, not like the whole document.
        window = builder.max_length - len(builder.prefix) - len(builder.suffix) - len(instruction)
        visible = tokenized.sentence_of_token[: max(window, 1)]
        k = config.k.sentences_per_block(visible[-1] + 1 if visible else 1)
        return builder.htp(
            blocks_of(tokenized, k), instruction,
            local_tokens=config.local_tokens, global_tokens=config.global_tokens,
        )

    def text_room(self, window: int, builder: LayoutBuilder, config: EncoderConfig) -> int:
        blocks = config.k.max_blocks if config.k.kind == "adaptive" else FIXED_K_BUDGETED_BLOCKS
        return window - blocks * (int(config.local_tokens) + int(config.global_tokens))

    def describe_parts(self, config: EncoderConfig, rewire: range) -> list[str]:
        return [f"k={config.k}", *super().describe_parts(config, rewire)]


_METHODS: dict[str, EncodingMethod] = {
    m.name: m
    for m in (HierarchicalTokenPrepending(), Vanilla(), LastToken(), Echo(), TokenPrepending(), PromptEOL())
}
assert tuple(_METHODS) == METHODS, "every configurable method needs a strategy, in METHODS order"


def method_for(name: str) -> EncodingMethod:
    """The strategy of the method called ``name`` (one of :data:`~htp_embed.config.METHODS`)."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
