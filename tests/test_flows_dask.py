"""Embedding on Dask: worker processes load the model once and build the same index as one
process. Real LocalClusters (worker processes, the tiny decoder loaded from disk in each) under
the Prefect test harness.

prefect-dask is part of the ``dist`` extra that ``make test`` installs, so a missing package
fails here rather than skipping.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from pipeline_helpers import long_doc, write_docs
from prefect_dask import DaskTaskRunner

from flows import runtime
from flows.dask_runner import (
    DaskSpec,
    encoder_cluster,
    local_cluster_kwargs,
    parse_dask_spec,
)
from flows.ingest import ingest_flow
from indexes import FaissVectorStore
from pipelines.settings import Settings

pytestmark = pytest.mark.server

DOCS = {f"doc{i}.txt": long_doc(12, seed=i) for i in range(6)}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def settings(tiny_model_dir) -> dict:
    """The tiny decoder by path, so every worker process can load it; one document per task, so
    the corpus fans out into several tasks per worker."""
    encoder = {"model": str(tiny_model_dir), "segmenter": "sentencizer", "show_progress": False,
               "rewire_start": 1, "rewire_stop": 3, "exit_layer": None, "k": "adaptive:4"}
    return Settings(encoder=encoder, chunk_size=48, chunk_overlap=0, nodes_per_batch=2).model_dump(mode="json")


@pytest.fixture(scope="module")
def cluster():
    """A 2-worker cluster shaped like the runner's own, kept up so the test can ask its workers
    afterwards what they loaded. It is told of 8 cores, so each worker's share (4 torch
    threads) differs from both torch's own default and the 1 thread Dask would impose."""
    from distributed import Client

    with encoder_cluster(**local_cluster_kwargs(2, cores=8)) as cluster, Client(cluster) as client:
        yield cluster, client


def embed_task_runs() -> int:
    """Completed embedding task runs the Prefect server knows of."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def count() -> int:
        async with get_client() as prefect:
            runs = await prefect.read_task_runs()
            return sum(run.name.startswith("embed-batch") and run.state_type.value == "COMPLETED" for run in runs)

    return asyncio.run(count())


def vectors(index) -> dict[str, np.ndarray]:
    return dict(FaissVectorStore.open(index).iter_embeddings())


def test_task_runner_names_parse():
    assert parse_dask_spec("dask") == DaskSpec()
    assert parse_dask_spec("dask=3") == DaskSpec(n_workers=3)
    assert parse_dask_spec("dask=tcp://10.0.0.5:8786") == DaskSpec(address="tcp://10.0.0.5:8786")
    for bad in ("dask=", "dask=0", "daskish"):
        with pytest.raises(ValueError):
            parse_dask_spec(bad)


def test_a_dask_address_is_checked_before_any_work():
    """'-1', 'abc', '2.5' and '+2' were taken as addresses; Dask refused them 25-35 s later."""
    for good in ("h:8786", "tls://h:8786", "[::1]:8786", "inproc://x"):
        assert parse_dask_spec(f"dask={good}") == DaskSpec(address=good)
    for bad in ("-1", "abc", "2.5", "+2", ":8786", "tcp://", "h:port"):
        with pytest.raises(ValueError, match="worker count .* scheduler address"):
            parse_dask_spec(f"dask={bad}")


def test_local_cluster_splits_the_cores_between_single_threaded_worker_processes():
    kwargs = local_cluster_kwargs(2, cores=8)
    assert kwargs["processes"] and kwargs["n_workers"] == 2 and kwargs["threads_per_worker"] == 1
    assert kwargs["env"]["OMP_NUM_THREADS"] == "4" and kwargs["dashboard_address"] == "127.0.0.1:0"
    runner = runtime.task_runner_for("dask=2")
    assert isinstance(runner, DaskTaskRunner) and runner.cluster_kwargs["n_workers"] == 2
    assert runner.cluster_class is encoder_cluster
    assert runtime.task_runner_for("dask=tcp://127.0.0.1:8786").address == "tcp://127.0.0.1:8786"


def test_two_local_workers_build_the_same_index_as_one_process(harness, tmp_path, settings):
    source = write_docs(tmp_path / "src", DOCS)
    single = ingest_flow(str(source), str(tmp_path / "single"), settings, task_runner="thread")
    spread = ingest_flow(str(source), str(tmp_path / "dask"), settings, task_runner="dask=2")
    assert single["failed"] == spread["failed"] == 0
    assert spread["nodes_embedded"] == single["nodes_embedded"] >= 6
    want, got = vectors(tmp_path / "single"), vectors(tmp_path / "dask")
    assert sorted(got) == sorted(want) and len(got) == single["nodes_embedded"]
    assert max(float(np.abs(got[node] - want[node]).max()) for node in want) < 1e-5


def test_each_worker_loads_the_model_once_with_its_share_of_the_cores(harness, tmp_path, settings, cluster):
    _, client = cluster
    source = write_docs(tmp_path / "src", DOCS)
    before = embed_task_runs()
    stats = ingest_flow(str(source), str(tmp_path / "idx"), settings,
                        task_runner=f"dask={client.scheduler.address}")
    assert stats["failed"] == 0 and stats["nodes_embedded"] >= 12  # 6 tasks for 2 workers
    # the workers reported their task runs to the flow's Prefect server (which records them
    # from events, a moment later)
    batches = len(DOCS)  # batches hold whole documents, and each has more than 2 nodes
    deadline = time.monotonic() + 30
    while embed_task_runs() - before < batches and time.monotonic() < deadline:
        time.sleep(0.5)
    assert embed_task_runs() - before == batches
    reports = client.run(runtime.process_report)
    # both single-threaded workers get tasks from the first wave on, and neither reloads
    assert [r["models_loaded"] for r in reports.values()] == [1, 1]
    assert all(r["torch_threads"] == 4 for r in reports.values())
    assert len({r["pid"] for r in reports.values()}) == 2
    # Dask's eager malloc trimming (25% slower encoding) is not in the workers' environment
    assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}


def test_a_scheduler_that_does_not_answer_or_has_no_workers_is_named_before_any_work():
    """Nothing listening failed 30 s after the model load and the plan; a scheduler without
    workers made the run wait without a word, forever, holding the index's writer lock."""
    from distributed import LocalCluster

    from flows.dask_runner import wait_for_scheduler

    with pytest.raises(RuntimeError, match="no Dask scheduler answers at tcp://127.0.0.1:1"):
        wait_for_scheduler("tcp://127.0.0.1:1", connect_seconds=1)
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty:
        with pytest.raises(RuntimeError, match="had no workers for 1 s.*dask worker"):
            wait_for_scheduler(empty.scheduler_address, worker_seconds=1)
        empty.scale(1)
        wait_for_scheduler(empty.scheduler_address, worker_seconds=30)  # a worker: ready
