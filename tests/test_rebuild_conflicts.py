"""A rebuild or restore while a program writes through the Python API (which takes no lock):
the program's acknowledged commit used to be dropped without a word, since a staged
replacement and a roll-back replaced whatever was live. Each now refuses to switch."""

from __future__ import annotations

import pytest
from llama_index.core import Document
from pipeline_helpers import settings_for

from indexes import FaissVectorStore, IndexConflictError
from pipelines import engine
from pipelines.engine import IndexSession, embed_batch
from pipelines.maintenance import restore_index
from pipelines.query import open_index


def _commit_through_the_api(index_dir, settings, embedding, doc_id: str) -> int:
    """What an app does: insert a document through ``as_index()`` and persist it."""
    index = open_index(index_dir, settings, embedding=embedding)
    index.as_index().insert(Document(text=f"{doc_id} arrived through the API while a rebuild ran.", id_=doc_id))
    return index.store.persist()


def _live_docs(index_dir, settings, embedding) -> set[str]:
    store = open_index(index_dir, settings, embedding=embedding).store
    return {node.ref_doc_id for node in store.iter_nodes()}


def test_a_rebuild_is_not_switched_to_over_a_commit_made_while_it_ran(index_dir, embedding):
    settings = settings_for(embedding)
    with IndexSession.open(index_dir, settings, encoder=embedding.encoder) as session:
        plan = session.plan_rebuild()
        embedded = [embed_batch(batch, session.encoder) for batch in plan.nodes.batches(8)]
        acknowledged = _commit_through_the_api(index_dir, settings, embedding, "api-doc")
        with pytest.raises(IndexConflictError, match=f"after this rebuild read version {plan.base_version}"):
            session.write_rebuild(plan, embedded)
    assert FaissVectorStore.current_version(index_dir) == acknowledged
    assert "api-doc" in _live_docs(index_dir, settings, embedding)
    # read again from the new live version, the same rebuild switches
    with IndexSession.open(index_dir, settings, encoder=embedding.encoder) as session:
        stats = session.rebuild()
    assert stats.version == acknowledged + 1 and "api-doc" in _live_docs(index_dir, settings, embedding)


def test_a_rebuild_keeping_the_vectors_refuses_the_same_way(index_dir, embedding, monkeypatch):
    settings = settings_for(embedding)
    real_verify = engine.verify

    def verify_then_commit(*args, **kwargs):  # the API write lands while the rebuild runs
        real_verify(*args, **kwargs)
        _commit_through_the_api(index_dir, settings, embedding, "api-doc")

    monkeypatch.setattr(engine, "verify", verify_then_commit)
    with IndexSession.open(index_dir, settings, encoder=embedding.encoder) as session, \
            pytest.raises(IndexConflictError, match="Run the rebuild again"):
        session.rebuild_keeping_vectors()
    assert "api-doc" in _live_docs(index_dir, settings, embedding)


def test_a_restore_refuses_a_version_committed_while_it_ran(index_dir, embedding, monkeypatch):
    settings = settings_for(embedding)
    restore_point = FaissVectorStore.current_version(index_dir)
    _commit_through_the_api(index_dir, settings, embedding, "before-restore")
    real_restore = FaissVectorStore.restore

    def restore_after_a_commit(self, over=None):
        _commit_through_the_api(index_dir, settings, embedding, "during-restore")
        return real_restore(self, over)

    monkeypatch.setattr(FaissVectorStore, "restore", restore_after_a_commit)
    with pytest.raises(IndexConflictError):
        restore_index(index_dir, restore_point, settings)
    assert "during-restore" in _live_docs(index_dir, settings, embedding)
    monkeypatch.undo()
    # the roll-back the user asked for, asked again, drops both (that is what a restore is)
    restore_index(index_dir, restore_point, settings)
    assert not {"before-restore", "during-restore"} & _live_docs(index_dir, settings, embedding)


def test_replaces_needs_a_staged_replacement(tmp_path):
    with pytest.raises(ValueError, match="overwrite=True and persist_now=False"):
        FaissVectorStore.create(tmp_path / "idx", dim=4, encoder={"model": "m"}, replaces=1)


def test_a_restore_refuses_a_version_a_killed_write_left_past_the_live_one(index_dir, embedding):
    """A write killed after its version folder was complete but before CURRENT named it leaves
    a version that was never acknowledged nor served; restore made it live ('restored version
    18: live version 19'), serving a document no ingest ever reported."""
    import shutil

    from indexes import persist
    from pipelines.errors import VersionNotKeptError

    settings = settings_for(embedding)
    live = FaissVectorStore.current_version(index_dir)
    shutil.copytree(persist.version_dir(index_dir, live), persist.version_dir(index_dir, live + 1))
    with pytest.raises(VersionNotKeptError, match=f"version {live + 1} of .* was never live"):
        restore_index(index_dir, live + 1, settings)
    assert FaissVectorStore.current_version(index_dir) == live
