"""Splitting documents into nodes sized for the encoder's window.

HTP is at its best on long texts, so by default a node fills the encoder's window, minus what
the encoder adds around a text (HTP: one <PST> and one <B-PST> per block, at most
``max_blocks`` blocks under the adaptive K policy; the template's special tokens). Node ids are deterministic
(``<doc_id>#<n>``), so re-ingesting a document converges to the same ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from llama_index.core import Document
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode, MetadataMode, TextNode

from htp_embed import HTPEncoder
from pipelines.sources import SourceDocument

# Room kept for the splitter counting tokens of pieces slightly differently from the tokenizer
# on the whole text (the template's special tokens are in the encoder's budget). 7 keeps the
# default encoder's nodes at the 488 tokens they had before the budget was the encoder's.
TEMPLATE_MARGIN = 7


def default_chunk_size(encoder: HTPEncoder) -> int:
    """Tokens per node that fit the encoder's window with its method's placeholders and
    template budgeted (the encoder knows them: :attr:`HTPEncoder.text_budget`)."""
    return max(32, encoder.text_budget - TEMPLATE_MARGIN)


def node_id_for(index: int, document: BaseNode) -> str:
    return f"{document.id_}#{index}"


# LlamaIndex's fallback for a sentence longer than a node (CHUNKING_REGEX: cut after , . ; and
# their CJK forms), with line breaks and tabs as cut points too. Without them a list of one word
# a line (hashes, identifiers, a log) or tab-separated text with no space went on to the
# splitter's last resort, single characters, and a word across a node boundary was cut in two:
# neither node held it, and keyword search could not find it.
SENTENCE_PIECES = "[^,.;。？！\n\t]+[,.;。？！\n\t]?|[,.;。？！\n\t]"


def make_splitter(
    tokenize: Callable[[str], list[int]], chunk_size: int, chunk_overlap: int
) -> SentenceSplitter:
    """A LlamaIndex sentence splitter counting tokens with the encoder's own tokenizer."""
    return SentenceSplitter(
        secondary_chunking_regex=SENTENCE_PIECES,
        chunk_size=chunk_size,
        chunk_overlap=min(chunk_overlap, chunk_size // 4),  # engine.MAX_OVERLAP_SHARE; old manifests may record more
        tokenizer=tokenize,
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
