"""The service, the CLI and eval used to report success while being wrong: an index recreated
at the same version number kept the old one served, rebuild --source reported 0 deleted,
eval dropped options, --json left out the version (found by an audit; each failed before its
fix). The flow's Partial state is tested in test_flows.py."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient
from pipeline_helpers import cli_env, settings_for, write_docs

from indexes import FaissVectorStore
from pipelines.errors import CorrectionMismatchError
from pipelines.ingest import ingest
from pipelines.query import open_index
from pipelines.service import IndexHolder, create_app


def test_service_switches_to_an_index_recreated_at_the_same_version_number(tmp_path, embedding):
    """The product's own advice for emptying an index is to remove its directory and ingest
    again; the new index starts again at version 1. The service compares version numbers only,
    so it keeps answering 200 from the removed index's files (held open) forever."""
    settings = settings_for(embedding)
    index_dir = tmp_path / "idx"
    ingest(write_docs(tmp_path / "old", {"cats.txt": "the cat sat on the mat ."}), index_dir, settings,
           embedding=embedding)
    holder = IndexHolder(index_dir, settings, open_index(index_dir, settings, embedding=embedding))
    with TestClient(create_app(index_dir, settings, holder=holder, reload_interval=0)) as client:
        assert client.post("/query", json={"query": "the cat", "top_k": 3}).json()["version"] == 1
        shutil.rmtree(index_dir)
        stats = ingest(write_docs(tmp_path / "new", {"sea.md": "fish swam in the sea ."}), index_dir, settings,
                       embedding=embedding)
        assert stats.version == 1  # a new index, the same version number
        holder.refresh()  # what the watcher does every reload_interval
        body = client.post("/query", json={"query": "the cat", "top_k": 3}).json()
        assert [r["doc_id"] for r in body["results"]] == ["sea.md"], body


def test_rebuild_from_a_source_reports_the_documents_it_drops(index_dir, embedding, tmp_path):
    """`rebuild --source` drops indexed documents missing from the source (as ingest deletes
    them), but its statistics (the CLI table and --json) say deleted 0."""
    from pipelines.rebuild import rebuild

    source = write_docs(tmp_path / "fewer", {"cats.txt": "the cat sat on the mat . the dog ran in the park !"})
    stats = rebuild(index_dir, settings_for(embedding), source=source, embedding=embedding)
    remaining = set(open_index(index_dir, settings_for(embedding), embedding=embedding).store.doc_hashes())
    assert remaining == {"cats.txt"}  # sea.md and night.txt are gone from the live version
    assert stats.deleted == 2, stats.to_json()


def _beir(tmp_path):
    from pipelines.beir import Document, write_beir

    corpus = {f"d{i}": Document(f"title {i}", f"the cat {i} sat on the mat near the dog {i} .") for i in range(10)}
    return write_beir(tmp_path / "beir", corpus, {"q1": "the cat 3"}, {"q1": {"d3": 1}}, split="train")


def test_eval_pipeline_json_reports_the_alpha_the_hybrid_search_used(tiny_model_dir, tmp_path, monkeypatch):
    """`eval --pipeline --json` (hybrid, no --alpha) says "alpha": null, while the search fused
    with the tuned default (indexes.fusion.DEFAULT_ALPHA)."""
    import json

    from typer.testing import CliRunner

    from htp_cli.main import app
    from indexes.fusion import DEFAULT_ALPHA

    env = cli_env(tiny_model_dir, tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["eval", str(_beir(env)), "--pipeline", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "hybrid"
    assert report["alpha"] == DEFAULT_ALPHA, report


def test_eval_pipeline_refuses_options_it_does_not_apply(tiny_model_dir, tmp_path, monkeypatch):
    """--fuse-bm25 and --cache-dir are not encoder options (the help says only those are
    ignored with --pipeline), yet `eval --pipeline --fuse-bm25` exits 0 with an unfused score."""
    from typer.testing import CliRunner

    from htp_cli.main import app

    env = cli_env(tiny_model_dir, tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["eval", str(_beir(env)), "--pipeline", "--fuse-bm25", "--json"])
    assert result.exit_code == 2, result.output


def test_rebuild_keeping_vectors_applies_the_correction_setting(tmp_path, embedding):
    """`rebuild --keep-vectors` keeps the stored vectors and their correction; with another
    `correction` set explicitly it used to copy the old one and report success: refused now,
    as bad usage (exit 2, as ingest refuses it), not as a failed run a retry might pass."""
    from pipelines.rebuild import rebuild

    docs = {f"d{i}.txt": f"the cat {i} sat on the mat near the dog {i} ." for i in range(12)}
    index_dir = tmp_path / "idx"
    ingest(write_docs(tmp_path / "src", docs), index_dir, settings_for(embedding), embedding=embedding)
    assert open_index(index_dir, settings_for(embedding), embedding=embedding).store.correction is not None
    version = FaissVectorStore.read_manifest(index_dir).version
    with pytest.raises(CorrectionMismatchError, match="without --keep-vectors"):
        rebuild(index_dir, settings_for(embedding, correction="none"), keep_vectors=True, embedding=embedding)
    assert FaissVectorStore.read_manifest(index_dir).version == version


def test_ingest_json_names_the_version_it_wrote(tiny_model_dir, tmp_path, monkeypatch):
    """The table of `ingest` shows the version written and the count; `--json` drops both
    (and tokens), so a script cannot tell which version its run made live."""
    import json

    from typer.testing import CliRunner

    from htp_cli.main import app

    env = cli_env(tiny_model_dir, tmp_path, monkeypatch)
    write_docs(env / "src")
    result = CliRunner().invoke(app, ["ingest", "src", "--index", "idx", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats.get("version") == 1 and stats.get("count") == 3, stats
