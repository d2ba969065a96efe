"""Splitting documents into nodes: every word whole in some node, whatever separates words."""

from __future__ import annotations

import hashlib

import pytest

from pipelines.chunking import make_splitter, split_documents
from pipelines.sources import SourceDocument


def four_chars_a_token(text: str) -> list[int]:
    return list(range((len(text) + 3) // 4))


@pytest.mark.parametrize("separator", ["\n", "\t", "\r\n"])
def test_words_separated_without_spaces_are_never_cut_across_nodes(separator):
    """A list of hashes one a line was split by characters (LlamaIndex's last resort), and 31 of
    300 lay across a node boundary, in no node whole: keyword search never found them."""
    words = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(300)]
    text = separator.join(words)
    document = SourceDocument(doc_id="hashes.txt", text=text)
    nodes = split_documents([document], make_splitter(four_chars_a_token, 128, 16))
    assert len(nodes) > 10
    held = [node.get_content() for node in nodes]
    assert [word for word in words if not any(word in node for node in held)] == []
