"""Dask task runners: a local cluster shaped for a CPU encoder, or an existing cluster.

Spellings of ``--task-runner``:

* ``dask`` -- a temporary ``LocalCluster`` with :func:`default_worker_count` workers;
* ``dask=N`` -- the same with N workers;
* ``dask=ADDRESS`` -- an existing scheduler (``tcp://host:8786``); its workers are used as
  they were started.

A local cluster uses worker *processes* with one Dask thread each: the encoder is a PyTorch
model, and one model per process computing on its own cores beats several Dask threads
fighting over one interpreter and one set of intra-op threads. The machine's cores are split
evenly between the workers' torch threads (``HTP_TORCH_THREADS``, read by
:func:`flows.runtime.cached_encoder`), so workers never oversubscribe the CPU.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (and one OpenMP thread),
which returns freed memory to the OS so eagerly that each forward pass pays page faults for its
activations: the encoder ran 25% slower with it on our 2-core CPU. :func:`encoder_cluster` starts
workers without it, and sets thread counts in the workers alone, not in the calling process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A float32 copy of the default 270M-parameter model is ~1.1 GB; with activations, tokenizer
# and Python a busy worker peaked at 2.1-2.3 GB (benchmarks/results/dask_scale.md). 3 GiB leaves room.
WORKER_MEMORY_BYTES = 3 * 2**30
TORCH_THREADS_ENV = "HTP_TORCH_THREADS"


@dataclass(frozen=True)
class DaskSpec:
    """What a ``dask[=…]`` task-runner name asks for."""

    address: str | None = None
    n_workers: int | None = None


def parse_dask_spec(name: str) -> DaskSpec:
    """``dask`` / ``dask=N`` / ``dask=ADDRESS`` -> :class:`DaskSpec`; anything else is refused."""
    if name == "dask":
        return DaskSpec()
    if not name.startswith("dask="):
        raise ValueError(f"{name!r} is not a dask task runner; use 'dask', 'dask=N' or 'dask=ADDRESS'")
    value = name.split("=", 1)[1].strip()
    if value.isdigit():
        if int(value) < 1:
            raise ValueError(f"{name!r}: a local Dask cluster needs at least 1 worker")
        return DaskSpec(n_workers=int(value))
    if not value:
        raise ValueError("'dask=' needs a worker count or a scheduler address (tcp://host:8786)")
    if not _looks_like_scheduler_address(value):
        # Dask refused these only once it connected, after the server, the model and the plan
        raise ValueError(
            f"{name!r}: {value!r} is neither a worker count (a whole number, at least 1) nor a "
            "scheduler address (SCHEME://HOST:PORT such as tcp://host:8786, or HOST:PORT)"
        )
    return DaskSpec(address=value)


def _looks_like_scheduler_address(value: str) -> bool:
    """``scheme://rest`` or ``host:port`` with a numeric port: the forms Dask's Client connects to."""
    scheme, sep, rest = value.partition("://")
    if sep:
        return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme)) and bool(rest.strip())
    host, colon, port = value.rpartition(":")
    return bool(colon and host.strip("[]") and port.isdigit() and " " not in value)


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_worker_count(cores: int | None = None, available_memory: int | None = None) -> int:
    """One worker per core, fewer when memory cannot hold a model copy in each.

    On a quiet 2-core machine 2x1 threads matched 1x2; with other jobs on the cores the single-
    threaded processes were 1.5x faster, since they never wait on each other's intra-op threads.
    """
    cores = cores or available_cores()
    if available_memory is None:
        import psutil  # a dependency of distributed

        available_memory = psutil.virtual_memory().available
    return max(1, min(cores, available_memory // WORKER_MEMORY_BYTES))


def torch_threads(environ: Mapping[str, str] = os.environ) -> int | None:
    """The torch thread count ``HTP_TORCH_THREADS`` asks for (None: unset), at least 1.

    Checked by the command line before a flow starts: a worker read it only at its first model
    load, so ``four`` failed every embedding task, retried, as a bare ``int()`` error (exit 1)."""
    from htp_embed.config import EncoderSettingError

    value = environ.get(TORCH_THREADS_ENV, "").strip()
    if not value:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        raise EncoderSettingError(f"{TORCH_THREADS_ENV}={value!r} is not a number of torch threads: set a "
                                  "whole number such as 4, or unset it") from None


def torch_threads_per_worker(n_workers: int, cores: int | None = None) -> int:
    """The cores split evenly between the workers, at least one thread each."""
    return max(1, (cores or available_cores()) // n_workers)


def local_cluster_kwargs(n_workers: int | None = None, cores: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``distributed.LocalCluster`` for ``n_workers`` encoder workers."""
    n_workers = n_workers or default_worker_count(cores)
    threads = str(torch_threads_per_worker(n_workers, cores))
    return {
        "n_workers": n_workers,
        "processes": True,
        "threads_per_worker": 1,
        # The scheduler's HTTP server (the dashboard, when bokeh is installed) on a free loopback
        # port: the default 8787 clashes between concurrent runs, and None still binds 8787.
        "dashboard_address": "127.0.0.1:0",
        # Each worker's share of the cores, set in the worker before it imports torch.
        "env": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
                TORCH_THREADS_ENV: threads},
    }


def encoder_cluster(**kwargs: Any):
    """A ``distributed.LocalCluster`` whose workers start without Dask's pre-spawn environment
    (eager malloc trimming, one OpenMP thread); ``kwargs`` as from :func:`local_cluster_kwargs`."""
    import dask
    from distributed import LocalCluster

    # The nannies read this while the (synchronous) cluster starts them, inside this block.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        return LocalCluster(**kwargs)


#: How long a run waits for a scheduler to answer, and then for its first worker.
CONNECT_SECONDS = 15.0
WORKER_WAIT_SECONDS = 120.0


def wait_for_scheduler(
    address: str, connect_seconds: float = CONNECT_SECONDS, worker_seconds: float = WORKER_WAIT_SECONDS
) -> None:
    """Check, before a run plans anything, that a scheduler answers at ``address`` and has a
    worker, waiting up to ``worker_seconds`` for one (logged). Why: with nothing listening the
    run failed 30 s after loading the model and planning; with a scheduler but no workers it
    waited without a word, forever, holding the index's writer lock."""
    import logging

    from distributed import Client

    log = logging.getLogger(__name__)
    try:
        client = Client(address, timeout=connect_seconds, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise RuntimeError(
            f"no Dask scheduler answers at {address} within {connect_seconds:.0f} s ({exc}); "
            f"start one with `dask scheduler` and workers with `dask worker {address}`"
        ) from exc
    try:
        if not client.scheduler_info().get("workers"):
            log.warning("the Dask scheduler at %s has no workers; waiting up to %.0f s for one "
                        "(start them with `dask worker %s`)", address, worker_seconds, address)
            try:
                client.wait_for_workers(1, timeout=worker_seconds)
            except TimeoutError as exc:
                raise RuntimeError(
                    f"the Dask scheduler at {address} had no workers for {worker_seconds:.0f} s; "
                    f"start them with `dask worker {address}`"
                ) from exc
    finally:
        client.close()


def dask_task_runner(name: str):
    """A ``prefect_dask.DaskTaskRunner`` for ``dask``, ``dask=N`` or ``dask=ADDRESS``."""
    spec = parse_dask_spec(name)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise RuntimeError('the dask task runner needs the "dist" extra: pip install "htp-index[dist]"') from exc
    if spec.address:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(cluster_class=encoder_cluster, cluster_kwargs=local_cluster_kwargs(spec.n_workers))
