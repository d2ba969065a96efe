"""Typed settings: a --config file is used for one call only, GPU wishes are booleans, and an
existing index refuses an index kind it was not built as (naming rebuild)."""

from __future__ import annotations

import os

import pytest
from pipeline_helpers import settings_for, tiny_embedding, write_docs

from pipelines.errors import IndexKindMismatchError
from pipelines.ingest import ingest
from pipelines.settings import CONFIG_ENV, Settings, load_settings


def test_a_config_file_applies_to_its_call_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    config = tmp_path / "other.toml"
    config.write_text('index_kind = "hnsw"\nchunk_size = 99\n')
    chosen = load_settings(config)
    assert (chosen.index_kind, chosen.chunk_size) == ("hnsw", 99)
    assert CONFIG_ENV not in os.environ
    assert load_settings().index_kind == "auto"  # the next call does not inherit it
    with pytest.raises(FileNotFoundError, match="--config"):
        load_settings(tmp_path / "missing.toml")


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("false", False), ("auto", "auto")])
def test_use_gpu_is_a_boolean_or_auto(monkeypatch, value, expected):
    monkeypatch.setenv("HTP_INDEX_USE_GPU", value)
    assert Settings().use_gpu == expected
    assert Settings().faiss_placement()["use_gpu"] == expected


def test_an_index_kind_the_index_was_not_built_as_is_refused_naming_rebuild(tmp_path):
    embedding = tiny_embedding()
    source = write_docs(tmp_path / "src")
    ingest(source, tmp_path / "idx", settings_for(embedding), embedding=embedding)
    with pytest.raises(IndexKindMismatchError, match="rebuild --index .* --index-kind hnsw"):
        ingest(source, tmp_path / "idx", settings_for(embedding, index_kind="hnsw"), embedding=embedding)
    ingest(source, tmp_path / "idx", settings_for(embedding, index_kind="auto"), embedding=embedding)
