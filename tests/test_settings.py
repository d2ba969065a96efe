"""Typed settings: a --config file is used for one call only, GPU wishes are booleans, and an
existing index refuses an index kind it was not built as (naming rebuild)."""

from __future__ import annotations

import os

import pytest
from pipeline_helpers import settings_for, tiny_embedding, write_docs

from pipelines.errors import IndexKindMismatchError
from pipelines.ingest import ingest
from pipelines.settings import CONFIG_ENV, Settings, load_settings, unknown_environment


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


def test_copies_and_transported_settings_read_no_file_or_environment_again(tmp_path, monkeypatch):
    """with_overrides and a flow run's settings (settings_from) validated through the usual
    sources: ./htp-index.toml and the environment were read again under what --config gave,
    so `ingest --config prod.toml --task-runner thread` built the local file's hnsw index."""
    from flows.runtime import settings_from

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    (tmp_path / "htp-index.toml").write_text('index_kind = "hnsw"\ncorrection = "none"\n')
    prod = tmp_path / "prod.toml"
    prod.write_text("chunk_size = 128\n")
    chosen = load_settings(prod)
    monkeypatch.setenv("HTP_INDEX_QUERY_MODE", "sparse")  # set after loading: not theirs
    for settings in (chosen, chosen.with_overrides(rerank=True), settings_from(chosen.to_transport())):
        assert (settings.index_kind, settings.correction, settings.chunk_size) == ("auto", "center", 128)
        assert settings.query_mode == "hybrid"
    assert chosen.with_overrides(rerank=True).rerank is True
    assert settings_from({}).index_kind == "auto"  # nothing explicit: every default, not the local file
    assert settings_from(None).index_kind == "hnsw"  # no settings sent: this process's own


def test_a_misspelled_variable_is_named_with_the_setting_it_was_probably_meant_for(monkeypatch, caplog):
    """pydantic-settings ignores an unknown HTP_INDEX_* variable: the default stayed in force."""
    found = unknown_environment({
        "HTP_INDEX_QUERYMODE": "sparse", "HTP_INDEX_ENCODER__DTYP": "float32", "HTP_INDEX_NOTHING_LIKE_IT": "1",
        "HTP_INDEX_QUERY_MODE": "sparse", "htp_index_encoder__dtype": "float32",  # settings (any case)
        "HTP_INDEX_API_TOKEN": "t", "HTP_INDEX_CACHE": "/c", "HTP_INDEX_CONFIG": "c.toml", "PATH": "/bin",
    })
    assert found == {"HTP_INDEX_QUERYMODE": "HTP_INDEX_QUERY_MODE", "HTP_INDEX_ENCODER__DTYP": "HTP_INDEX_ENCODER__DTYPE",
                     "HTP_INDEX_NOTHING_LIKE_IT": None}
    monkeypatch.setenv("HTP_INDEX_KEEPVERSIONS", "5")
    with caplog.at_level("WARNING", logger="pipelines.settings"):
        assert load_settings().keep_versions == 3  # ignored, as before, but said
        load_settings()
    said = [r.getMessage() for r in caplog.records if "HTP_INDEX_KEEPVERSIONS" in r.getMessage()]
    assert said == ["HTP_INDEX_KEEPVERSIONS is not a setting: it is ignored (did you mean HTP_INDEX_KEEP_VERSIONS?)"]


def test_k_is_written_in_the_environment_as_in_the_file_and_its_parts_are_settings(monkeypatch, caplog):
    """HTP_INDEX_ENCODER__K=adaptive:4 (the README's spelling) was "error parsing value for field
    'encoder'" (only JSON was read); K's parts were said to be ignored and were applied, and an
    unknown encoder variable was said to be ignored and then refused the settings."""
    for text, expected in (("adaptive:4", "adaptive:4"), ("3", "3"), ('"adaptive:2"', "adaptive:2")):
        monkeypatch.setenv("HTP_INDEX_ENCODER__K", text)
        assert str(Settings().encoder.k) == expected
    monkeypatch.setenv("HTP_INDEX_ENCODER__K", "adaptive8")
    with pytest.raises(ValueError, match="K policy must be"):
        Settings()
    monkeypatch.delenv("HTP_INDEX_ENCODER__K")
    assert unknown_environment({"HTP_INDEX_ENCODER__K__MAX_BLOCKS": "4"}) == {}
    monkeypatch.setenv("HTP_INDEX_ENCODER__METOD", "vanilla")
    with caplog.at_level("WARNING", logger="pipelines.settings"), pytest.raises(ValueError):
        load_settings()
    assert [r.getMessage() for r in caplog.records if "METOD" in r.getMessage()] == [
        "HTP_INDEX_ENCODER__METOD is not a setting: the encoder settings are refused with it "
        "(did you mean HTP_INDEX_ENCODER__METHOD?)"]


def test_a_lone_k_part_means_fixed_and_a_part_its_kind_does_not_use_is_refused(tmp_path, monkeypatch):
    """HTP_INDEX_ENCODER__K__K=3 (or [encoder.k] k = 3) was accepted and K built as adaptive:8,
    the k dropped without a word: only the kind decided."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTP_INDEX_ENCODER__K__K", "3")
    assert str(load_settings().encoder.k) == "3"
    monkeypatch.delenv("HTP_INDEX_ENCODER__K__K")
    (tmp_path / "htp-index.toml").write_text("[encoder.k]\nk = 3\n")
    settings = load_settings()
    assert str(settings.encoder.k) == "3"
    assert str(Settings.from_data(settings.to_transport()).encoder.k) == "3"  # a flow run reads it back
    for parts in ('kind = "adaptive"\nk = 3', 'kind = "fixed"\nk = 3\nmax_blocks = 4', "k = 3\nmax_blocks = 4"):
        (tmp_path / "htp-index.toml").write_text(f"[encoder.k]\n{parts}\n")
        with pytest.raises(ValueError, match="k = 3"):
            load_settings()


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


@pytest.mark.parametrize("value", ["inf", "nan", "1e13", "0"])
def test_max_document_mb_past_a_byte_count_is_a_setting_error(monkeypatch, tmp_path, value):
    """inf and 1e13 passed "> 0" and failed mid-ingest as an integer byte count ("cannot
    convert float infinity to integer", exit 1): the setting itself refuses them now."""
    from pydantic import ValidationError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv("HTP_INDEX_MAX_DOCUMENT_MB", value)
    with pytest.raises(ValidationError, match="max_document_mb"):
        load_settings()
    monkeypatch.setenv("HTP_INDEX_MAX_DOCUMENT_MB", "1048576")  # the bound itself: 1 TiB
    assert int(load_settings().max_document_mb * 2**20) == 2**40
