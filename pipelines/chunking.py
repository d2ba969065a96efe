"""Splitting documents into nodes sized for the encoder's window.

HTP is at its best on long texts, so by default a node fills the encoder's window, minus what
the encoder adds around a text (HTP: one <PST> and one <B-PST> per block, at most
``max_blocks`` blocks under the adaptive K policy; the template's special tokens). Node ids are deterministic
(``<doc_id>#<n>``), so re-ingesting a document converges to the same ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial

from llama_index.core import Document
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.node_parser.text.utils import split_by_sentence_tokenizer
from llama_index.core.schema import BaseNode, MetadataMode, TextNode

from htp_embed import HTPEncoder
from pipelines.sources import SourceDocument

# Room kept for the splitter counting tokens of pieces slightly differently from the tokenizer
# on the whole text (the template's special tokens are in the encoder's budget). 7 keeps the
# default encoder's nodes at the 488 tokens they had before the budget was the encoder's.
TEMPLATE_MARGIN = 7


# The smallest node (Settings.chunk_size's floor): a window that holds less text is refused.
MIN_CHUNK_SIZE = 32


def default_chunk_size(encoder: HTPEncoder) -> int:
    """Tokens per node that fit the encoder's window with its method's placeholders and
    template budgeted (the encoder knows them: :attr:`HTPEncoder.text_budget`)."""
    return max(MIN_CHUNK_SIZE, encoder.text_budget - TEMPLATE_MARGIN)


def node_id_for(index: int, document: BaseNode) -> str:
    return f"{document.id_}#{index}"


# LlamaIndex's fallback for a sentence longer than a node (CHUNKING_REGEX: cut after , . ; and
# their CJK forms), with line breaks and tabs as cut points too. Without them a list of one word
# a line (hashes, identifiers, a log) or tab-separated text with no space went on to the
# splitter's last resort, single characters, and a word across a node boundary was cut in two:
# neither node held it, and keyword search could not find it.
SENTENCE_PIECES = "[^,.;。？！\n\t]+[,.;。？！\n\t]?|[,.;。？！\n\t]"


# A text longer than this is tokenised, and split into sentences, a piece of at most this many
# characters at a time. The splitter tokenised a whole document to learn that it is longer than a
# node (~400 MiB for 1 MB of text: a 20 MB document, the readers' default limit, needed ~8 GB),
# and ran punkt's sentence regex over it in one pass, which nltk stops after 5 s: on a busy
# 2-core machine a 20 MB document failed with "regular-expression match exceeded its 5.0s time
# limit ... (catastrophic backtracking / ReDoS)". Texts this short, nearly every document and
# every paragraph of one, are split exactly as before.
PIECE_CHARS = 1 << 16
# Where a piece ends, best first: after a sentence's end, at a line break, at a space.
_PIECE_ENDS = (re.compile(r"[.!?][\"')\]]*\s+"), re.compile(r"\n+"), re.compile(r"\s+"))


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into consecutive pieces of at most ``size`` characters that join back to it,
    each ending after a sentence's end where the second half of the piece has one, else at a
    line break or a space (a run of one unbroken word is cut where it must be)."""
    out = []
    start = 0
    while len(text) - start > size:
        window = text[start + size // 2:start + size]
        cut = size
        for pattern in _PIECE_ENDS:
            ends = [match.end() for match in pattern.finditer(window)]
            if ends:
                cut = size // 2 + ends[-1]
                break
        out.append(text[start:start + cut])
        start += cut
    out.append(text[start:])
    return out


def _token_count(tokenize: Callable[[str], list[int]], text: str) -> range:
    """As many items as ``tokenize`` makes tokens of ``text`` (the splitter only takes the
    length), a piece at a time for a long text: summed over pieces cut at spaces, the count is
    the whole text's but for a token or so per cut, where the text is far longer than a node."""
    if len(text) <= PIECE_CHARS:
        return range(len(tokenize(text)))
    return range(sum(len(tokenize(piece)) for piece in pieces(text)))


def _sentences(text: str) -> list[str]:
    """LlamaIndex's sentences (punkt), found a piece of a long text at a time."""
    split = split_by_sentence_tokenizer()
    return [sentence for piece in pieces(text) for sentence in split(piece)]


def make_splitter(
    tokenize: Callable[[str], list[int]], chunk_size: int, chunk_overlap: int
) -> SentenceSplitter:
    """A LlamaIndex sentence splitter counting tokens with the encoder's own tokenizer, which
    reads a long text a piece at a time (:data:`PIECE_CHARS`)."""
    return SentenceSplitter(
        secondary_chunking_regex=SENTENCE_PIECES,
        chunk_size=chunk_size,
        chunk_overlap=min(chunk_overlap, chunk_size // 4),  # engine.MAX_OVERLAP_SHARE; old manifests may record more
        tokenizer=partial(_token_count, tokenize),
        chunking_tokenizer_fn=_sentences,
        id_func=node_id_for,
        include_metadata=True,
        include_prev_next_rel=True,
    )


def to_llama_document(doc: SourceDocument) -> Document:
    """A LlamaIndex Document whose metadata is kept with its nodes but not put into their text.

    Titles are already part of the text (see sources), so repeating metadata would only add
    noise such as file names, and would eat into the node's token budget.
    """
    document = Document(id_=doc.doc_id, text=doc.text, metadata={**doc.metadata, "doc_id": doc.doc_id})
    document.excluded_embed_metadata_keys = list(document.metadata)
    document.excluded_llm_metadata_keys = list(document.metadata)
    return document


def split_documents(docs: Sequence[SourceDocument], splitter: SentenceSplitter) -> list[TextNode]:
    """Nodes of the documents, each tagged with its document's id."""
    nodes = splitter.get_nodes_from_documents([to_llama_document(d) for d in docs])
    return [node for node in nodes if isinstance(node, TextNode) and embed_text(node).strip()]


def embed_text(node: BaseNode) -> str:
    """What the encoder sees for a node."""
    return node.get_content(metadata_mode=MetadataMode.EMBED)
