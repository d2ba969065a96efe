"""Shared pieces for pipeline, flow and CLI tests: a tiny encoder and settings that match it."""

from __future__ import annotations

from pathlib import Path

from tiny_decoder import WORDS, tiny_encoder

from htp_embed import config_from_identity
from htp_embed.llama_index import HTPEmbedding
from pipelines.settings import Settings

DOCS = {
    "cats.txt": "the cat sat on the mat . the dog ran in the park !",
    "sea.md": "fish swam in the sea . the sun rose over the hill .",
    "night.txt": "the moon set behind house . rain fell on city at night .",
}


def tiny_embedding() -> HTPEmbedding:
    return HTPEmbedding(tiny_encoder(k="adaptive:4"))


def settings_for(embedding: HTPEmbedding, **overrides) -> Settings:
    """Settings whose encoder is exactly the tiny one (so reopening matches its identity)."""
    encoder = config_from_identity(embedding.identity(), segmenter="sentencizer", show_progress=False)
    return Settings(encoder=encoder, chunk_size=overrides.pop("chunk_size", 48), chunk_overlap=0, **overrides)


def write_docs(folder: Path, docs: dict[str, str] = DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def long_doc(n_sentences: int, seed: int = 0) -> str:
    """Sentences of vocabulary words, enough to span several nodes."""
    words = [w for w in WORDS if w.isalpha()]
    return " ".join(
        " ".join(words[(seed + i * 7 + j) % len(words)] for j in range(8)) + " ." for i in range(n_sentences)
    )


def fail_embedding_of(embedding: HTPEmbedding, word: str, monkeypatch, message: str = "simulated encoder failure") -> None:
    """Make ``embedding`` raise for any batch holding ``word`` (a document that breaks the
    encoder), through ``monkeypatch`` (undone with it)."""
    real = embedding.encoder.encode_with_stats

    def fragile(texts, **kwargs):
        if any(word in text for text in texts):
            raise RuntimeError(message)
        return real(texts, **kwargs)

    monkeypatch.setattr(embedding.encoder, "encode_with_stats", fragile)


def cli_env(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> Path:
    """``tmp_path`` as the working folder of CLI runs on the tiny model (settings through the
    environment, as a user's shell would pass them)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", str(tiny_model_dir))
    monkeypatch.setenv("HTP_INDEX_ENCODER__SEGMENTER", "sentencizer")
    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "48")
    return tmp_path
