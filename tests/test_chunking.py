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


def words_a_token(text: str) -> list[int]:
    return list(range(len(text.split())))


def long_prose(words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(5000)}" + ("." if rng.random() < 0.07 else "") for _ in range(words))


def test_pieces_join_back_to_the_text_and_end_after_a_sentence():
    from pipelines.chunking import pieces

    text = long_prose(4000) + "\n" + "x" * 3000 + " tail"  # a run of one word longer than a piece
    cut = pieces(text, size=1000)
    assert "".join(cut) == text and all(len(piece) <= 1000 for piece in cut)
    prose = [piece for piece in cut[:-1] if "xxx" not in piece]
    assert len(prose) > 20 and all(piece.rstrip()[-1] == "." for piece in prose)
    assert pieces("short", size=1000) == ["short"]


def test_a_long_document_is_tokenised_and_sentence_split_a_piece_at_a_time(monkeypatch):
    """The splitter tokenised a whole document to learn it is longer than a node (~400 MiB a
    MB of text) and ran punkt over it in one pass, which nltk stops after 5 s (a 20 MB document
    failed as "catastrophic backtracking" on a busy machine). Nothing longer than a piece is
    tokenised or sentence-split now, and the nodes are the ones a whole-text split made."""
    from llama_index.core.node_parser import SentenceSplitter

    import pipelines.chunking as chunking

    text = long_prose(30000)  # ~200k characters, one paragraph
    assert len(text) > 2 * chunking.PIECE_CHARS
    longest = {"tokenised": 0, "sentence-split": 0}

    def tokenize(piece: str) -> list[int]:
        longest["tokenised"] = max(longest["tokenised"], len(piece))
        return words_a_token(piece)

    sentences = chunking.split_by_sentence_tokenizer

    def recording_sentences():
        split = sentences()

        def run(piece: str) -> list[str]:
            longest["sentence-split"] = max(longest["sentence-split"], len(piece))
            return split(piece)
        return run

    monkeypatch.setattr(chunking, "split_by_sentence_tokenizer", recording_sentences)
    document = SourceDocument(doc_id="long.txt", text=text)
    nodes = split_documents([document], make_splitter(tokenize, 480, 32))
    assert 0 < max(longest.values()) <= chunking.PIECE_CHARS
    whole = SentenceSplitter(secondary_chunking_regex=chunking.SENTENCE_PIECES, chunk_size=480, chunk_overlap=32,
                             tokenizer=words_a_token, id_func=chunking.node_id_for)
    assert [node.get_content() for node in nodes] == whole.split_text(text)
