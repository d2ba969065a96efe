"""The encoder identity names the weights: other weights saved under the same model directory
are refused by the query and ingest paths; dtype and device do not change the fingerprint;
indexes recorded with the older architecture-only fingerprint keep opening."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from pipeline_helpers import write_docs
from tiny_decoder import build_model
from transformers import AutoModel

import htp_embed.encoder
from htp_embed import EncoderConfig
from htp_embed import fingerprint as fp
from indexes import EncoderMismatchError, FaissVectorStore
from pipelines.ingest import ingest
from pipelines.query import open_index
from pipelines.settings import Settings


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny model directory (the tests overwrite its weights), with the
    fingerprint cache in a fresh directory."""
    monkeypatch.setenv("HTP_INDEX_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def settings_for(model: Path) -> Settings:
    encoder = EncoderConfig(model=str(model), segmenter="sentencizer", show_progress=False)
    return Settings(encoder=encoder, chunk_size=48, chunk_overlap=0)


def save_other_weights(model: Path) -> None:
    """A 'fine-tune' saved over the checkpoint: same architecture and vocabulary, new values.

    Encoders of one process share a loaded model while one holds it (htp_embed.encoder), so
    the encoders of the old weights are collected first, as in a new process.
    """
    vocab = AutoModel.from_pretrained(str(model)).config.vocab_size
    build_model(vocab, seed=1).save_pretrained(model)
    gc.collect()


def test_bf16_and_float32_loads_share_a_fingerprint_and_other_weights_do_not(model_dir, tmp_path):
    fp32 = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32)
    bf16 = AutoModel.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    assert fp.weights_digest(fp32) == fp.weights_digest(bf16)  # hashed, no cache involved
    first = fp.model_fingerprint(fp32)
    assert first.startswith("arch:") and fp.architecture_part(first) == fp.architecture_fingerprint(fp32.config)
    save_other_weights(model_dir)
    other = fp.model_fingerprint(AutoModel.from_pretrained(str(model_dir)))
    assert fp.architecture_part(other) == fp.architecture_part(first) and other != first


def test_the_digest_is_cached_per_checkpoint_and_invalidated_by_a_new_save(model_dir, monkeypatch):
    from htp_embed import HTPEncoder

    hashed = []
    real = fp.weights_digest
    monkeypatch.setattr(fp, "weights_digest", lambda model: hashed.append(1) or real(model))

    def fingerprint(dtype: str) -> str:
        encoder = HTPEncoder(model=str(model_dir), dtype=dtype, segmenter="sentencizer", show_progress=False)
        return encoder.identity()["model_fingerprint"]

    first = fingerprint("float32")
    again = fingerprint("bfloat16")  # another load (another dtype) of the same files
    assert first == again and len(hashed) == 1  # the second load read the cache
    save_other_weights(model_dir)
    assert fingerprint("float32") != first
    assert len(hashed) == 2
    # A decoder the caller loaded (and may have changed) is hashed itself, never from the cache.
    assert fp.model_fingerprint(AutoModel.from_pretrained(str(model_dir))) != first
    assert len(hashed) == 3


def test_the_digest_cache_lives_in_the_encoders_cache_dir(model_dir, tmp_path):
    """With ``cache_dir`` set, the dtype and packing measurements went there but the weights
    digest still went to $HTP_INDEX_CACHE."""
    from htp_embed import HTPEncoder

    chosen = tmp_path / "chosen"
    encoder = HTPEncoder(model=str(model_dir), segmenter="sentencizer", show_progress=False, cache_dir=chosen)
    encoder.identity()
    assert (chosen / fp.CACHE_FILE).is_file()
    assert not (tmp_path / "cache" / fp.CACHE_FILE).exists()


def test_an_index_refuses_queries_and_ingests_from_other_weights_in_the_same_directory(model_dir, tmp_path):
    settings = settings_for(model_dir)
    ingest(write_docs(tmp_path / "src"), tmp_path / "idx", settings)
    built = FaissVectorStore.read_manifest(tmp_path / "idx").encoder["model_fingerprint"]
    assert open_index(tmp_path / "idx", settings).search("the cat", top_k=2)

    save_other_weights(model_dir)
    with pytest.raises(EncoderMismatchError) as query_error:
        open_index(tmp_path / "idx", settings).search("the cat", top_k=2)
    new = query_error.value.expected["model_fingerprint"]
    assert new != built
    assert built in str(query_error.value) and new in str(query_error.value)
    assert "rebuild" in str(query_error.value)

    write_docs(tmp_path / "src", {"more.txt": "the bird sang in the tree ."})
    with pytest.raises(EncoderMismatchError) as ingest_error:
        ingest(tmp_path / "src", tmp_path / "idx", settings)
    assert built in str(ingest_error.value) and new in str(ingest_error.value)
    assert FaissVectorStore.read_manifest(tmp_path / "idx").encoder["model_fingerprint"] == built


def test_an_index_with_an_architecture_only_fingerprint_keeps_opening(model_dir, tmp_path, monkeypatch, caplog):
    def architecture_only(model: torch.nn.Module, cache_dir: Path | None = None) -> str:  # what htp-index wrote before
        return fp.architecture_fingerprint(model.config)

    settings = settings_for(model_dir)
    with monkeypatch.context() as patch:
        patch.setattr(htp_embed.encoder, "_model_fingerprint", architecture_only)
        ingest(write_docs(tmp_path / "src"), tmp_path / "idx", settings)
    recorded = FaissVectorStore.read_manifest(tmp_path / "idx").encoder["model_fingerprint"]
    assert fp.is_architecture_only(recorded)

    with caplog.at_level(logging.WARNING, logger="pipelines.identity_check"):
        assert open_index(tmp_path / "idx", settings).search("the cat", top_k=2)
        assert open_index(tmp_path / "idx", settings).search("the sea", top_k=2)
        write_docs(tmp_path / "src", {"more.txt": "the bird sang in the tree ."})
        stats = ingest(tmp_path / "src", tmp_path / "idx", settings)
    assert stats.added == 1
    said = [r.getMessage() for r in caplog.records if "architecture-only" in r.getMessage()]
    assert len(said) == 1 and recorded in said[0] and "upgraded" in said[0]
    upgraded = FaissVectorStore.read_manifest(tmp_path / "idx").encoder["model_fingerprint"]
    assert upgraded.startswith(f"arch:{recorded}/weights:")  # the write carried the new record
    assert open_index(tmp_path / "idx", settings).search("the bird", top_k=1)


def test_an_architecture_only_record_is_accepted_only_for_its_architecture():
    current = {"model": "m", "model_fingerprint": "arch:0123456789abcdef/weights:" + "0" * 32, "dim": 8}
    assert fp.upgradable({**current, "model_fingerprint": "0123456789abcdef"}, current)
    assert not fp.upgradable({**current, "model_fingerprint": "fedcba9876543210"}, current)
    assert not fp.upgradable({**current, "model_fingerprint": "0123456789abcdef", "dim": 9}, current)
    assert not fp.accepts({**current, "model_fingerprint": "arch:0123456789abcdef/weights:" + "1" * 32}, current)


def test_a_process_holding_the_old_weights_loads_the_new_ones_saved_over_them(model_dir):
    """A live encoder keeps its model in memory; weights saved again under the same path are
    loaded again by the next encoder, not served from that copy (the service reopening an
    index rebuilt with a fine-tune of the same directory)."""
    from htp_embed import HTPEncoder

    config = settings_for(model_dir).encoder
    old = HTPEncoder(config)
    assert HTPEncoder(config).model is old.model  # unchanged files: the loaded copy is shared
    before = old.encode_documents(["the cat sat on the mat ."])
    vocab = old.model.config.vocab_size
    build_model(vocab, seed=1).save_pretrained(model_dir)  # `old` stays alive meanwhile
    new = HTPEncoder(config)
    assert new.model is not old.model
    assert new.identity()["model_fingerprint"] != old.identity()["model_fingerprint"]
    assert float((new.encode_documents(["the cat sat on the mat ."]) @ before.T).item()) < 0.9999


def test_a_model_named_by_package_keeps_its_digest_cached_by_the_directory_it_was_read_from(model_dir, tmp_path):
    """Packaged models are named, not given as a directory: recording no key for them must
    leave the fingerprint cached per the directory they were read from (no rehash per process)."""
    model = AutoModel.from_pretrained(str(model_dir))
    fp.remember_checkpoint(model, fp.checkpoint_key("gemma3-270m"))  # a name: no key
    fingerprint = fp.model_fingerprint(model)
    cache = json.loads((tmp_path / "cache" / fp.CACHE_FILE).read_text())
    assert any(key.endswith(str(model_dir.resolve())) and entry["weights"] in fingerprint
               for key, entry in cache.items())
