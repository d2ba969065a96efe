"""Two writers on one index: the second waits for the first or fails clearly; never interleaves."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from crash_harness import Job, context, job_settings, run, run_job, snapshot, write_corpus

from pipelines.errors import IndexBusyError
from pipelines.ingest import ingest
from pipelines.lock import HOLDER_NAME, index_lock

pytestmark = pytest.mark.timeout(300)


def test_two_concurrent_ingests_run_one_after_the_other(tiny_model_dir, tmp_path):
    """Ingest A (30 documents) and, while it runs, ingest B (the same 30 plus 10): the index
    ends as one of the two serial orders, and every version in between is a whole run's."""
    small = write_corpus(tmp_path / "small", 30, seed=3)
    large = write_corpus(tmp_path / "large", 40, seed=3)
    expected = {}
    for name, order in {"a-then-b": (small, large), "b-then-a": (large, small)}.items():
        for source in order:
            assert run(Job("ingest", str(tmp_path / name), str(tiny_model_dir), str(source)))[0] == 0
        expected[name] = snapshot(tmp_path / name)
    alone = {}
    for name, source in {"a": small, "b": large}.items():
        assert run(Job("ingest", str(tmp_path / f"only-{name}"), str(tiny_model_dir), str(source)))[0] == 0
        alone[name] = snapshot(tmp_path / f"only-{name}")

    index = tmp_path / "shared"
    first = context().Process(target=run_job, args=(Job("ingest", str(index), str(tiny_model_dir), str(small)),))
    second = context().Process(target=run_job, args=(Job("ingest", str(index), str(tiny_model_dir), str(large)),))
    first.start()
    time.sleep(0.3)
    second.start()
    first.join(240)
    second.join(240)
    assert (first.exitcode, second.exitcode) == (0, 0)
    final = snapshot(index)
    assert any(final.same_content(serial) for serial in expected.values())
    # the first version is a whole run of one writer alone: nothing interleaved
    from indexes import FaissVectorStore

    versions = sorted(p.name for p in (index / "versions").iterdir() if p.name.startswith("v"))
    assert len(versions) == 2  # one per run: a new index is first written by its first run
    opened = [FaissVectorStore.open(index, version=int(v[1:]), use_gpu=False) for v in versions]
    ids = {node_id for node_id, _ in opened[0].iter_embeddings()}
    assert ids in ({*alone["a"].vectors}, {*alone["b"].vectors})


def test_a_second_writer_that_cannot_wait_fails_clearly_and_changes_nothing(tiny_model_dir, tmp_path):
    source = write_corpus(tmp_path / "src", 5, seed=4)
    index = tmp_path / "idx"
    assert run(Job("ingest", str(index), str(tiny_model_dir), str(source)))[0] == 0
    before = snapshot(index)
    shutil.copy(source / "doc000.txt", source / "copy.txt")
    settings = job_settings(str(tiny_model_dir)).model_copy(update={"lock_timeout": 0.5})
    busy = pytest.raises(IndexBusyError, match=rf"another writer holds .*: process {os.getpid()} on .* since ")
    with index_lock(index, timeout=1), busy:  # another writer holds the index, and says who it is
        ingest(source, index, settings)
    assert not (index / HOLDER_NAME).exists()  # the record goes with the lock
    after = snapshot(index)
    assert after.version == before.version and after.same_content(before)
