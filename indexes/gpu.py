"""Where searches run: on one GPU, on several GPUs, or on the CPU.

The CPU index is always the master copy: it takes adds and removes, answers filtered searches
and is what gets persisted (so a GPU index never needs copying back before ``write_index``).
A GPU placement adds a *search replica* cloned from it with ``index_cpu_to_gpu`` (one device)
or ``index_cpu_to_all_gpus`` / ``index_cpu_to_gpus_list`` (several, sharded or replicated).
Everything GPU-specific lives in this module, so the CPU twin is simply "no replica".

Decision rules (`choose_placement`):

* ``use_gpu=False`` -> CPU.
* ``use_gpu="auto"`` -> GPU when FAISS was built with GPU support and sees a device, else CPU,
  silently (a CPU-only machine is a normal place to run).
* ``use_gpu=True`` -> GPU when possible; otherwise a warning says why and the CPU is used. We
  never crash for lack of a GPU: the results are the same, only slower.
* ``gpus=…`` or ``shard=True`` with ``"auto"`` on a machine without GPUs -> the CPU, with one
  info line: the wish is noted (a config shared with GPU machines is normal), not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss

logger = logging.getLogger(__name__)

UseGpu = bool | Literal["auto"]
GpuSelection = int | Sequence[int] | Literal["all"] | None


@dataclass(frozen=True)
class Placement:
    """The devices a store searches on; empty `devices` means the CPU."""

    devices: tuple[int, ...] = ()
    shard: bool = False
    reason: str = ""

    @property
    def on_gpu(self) -> bool:
        """Whether searches go to a GPU replica."""
        return bool(self.devices)

    def describe(self) -> str:
        """``cpu``, ``gpu:0`` or ``gpu:0,1 (sharded)``."""
        if not self.devices:
            return "cpu"
        label = "gpu:" + ",".join(str(d) for d in self.devices)
        if len(self.devices) > 1:
            label += " (sharded)" if self.shard else " (replicated)"
        return label


@dataclass
class Replica:
    """A GPU copy of the CPU master; holds its GPU resources so they outlive the index."""

    index: Any
    resources: list[Any] = field(default_factory=list)


def gpu_count() -> int:
    """GPUs FAISS can use in this process (0 with a CPU-only FAISS build)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a broken CUDA install must not take the CPU path down with it
        logger.debug("faiss.get_num_gpus() failed", exc_info=True)
        return 0


def choose_placement(use_gpu: UseGpu, gpus: GpuSelection = None, shard: bool = False) -> Placement:
    """Decide CPU or GPU(s) from the caller's wish and what this machine has."""
    if use_gpu not in (True, False, "auto"):
        raise ValueError(f"use_gpu must be True, False or 'auto', not {use_gpu!r}")
    if use_gpu is False:
        return Placement(reason="use_gpu=False")
    available = gpu_count()
    if available == 0:
        why = (
            "this FAISS build has no GPU support (install the 'gpu' extra, faiss-gpu-cu12)"
            if not hasattr(faiss, "StandardGpuResources")
            else "no CUDA device is visible"
        )
        _log_cpu_fallback(use_gpu, gpus, shard, why)
        return Placement(reason=why)
    devices = _select_devices(gpus, available)
    return Placement(devices=devices, shard=shard and len(devices) > 1, reason="GPU available")


def _log_cpu_fallback(use_gpu: UseGpu, gpus: GpuSelection, shard: bool, why: str) -> None:
    """One line when GPUs were asked for and none can be used: a warning for ``use_gpu=True``,
    info for a GPU selection under ``"auto"``, nothing for a plain ``"auto"``."""
    asked = [f"use_gpu={use_gpu}"]
    if gpus is not None:
        asked.append(f"gpus={gpus!r}")
    if shard:
        asked.append("shard=True")
    if use_gpu is not True and len(asked) == 1:
        return
    level = logging.WARNING if use_gpu is True else logging.INFO
    logger.log(level, "%s: FAISS sees no GPU, searching on the CPU instead (%s)", ", ".join(asked), why)


def _select_devices(gpus: GpuSelection, available: int) -> tuple[int, ...]:
    if gpus is None:
        return (0,)
    if gpus == "all":
        return tuple(range(available))
    if isinstance(gpus, int):
        chosen: tuple[int, ...] = (gpus,)
    else:
        chosen = tuple(int(g) for g in gpus)
    bad = [g for g in chosen if not 0 <= g < available]
    if bad or not chosen:
        raise ValueError(f"gpus={gpus!r} names devices this machine lacks (it has {available})")
    return chosen


def clone_to_gpu(cpu_index: faiss.Index, placement: Placement) -> Replica:
    """Copy the CPU master to the placement's GPU(s); raises if the kind cannot go there."""
    devices = list(placement.devices)
    if len(devices) == 1:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, devices[0], cpu_index)
        return Replica(index=index, resources=[res])
    options = faiss.GpuMultipleClonerOptions()
    options.shard = placement.shard
    if devices == list(range(gpu_count())):
        index = faiss.index_cpu_to_all_gpus(cpu_index, co=options)
    else:
        index = faiss.index_cpu_to_gpus_list(cpu_index, co=options, gpus=devices)
    # index_cpu_to_gpus_list keeps its resources on the returned index.
    return Replica(index=index, resources=list(getattr(index, "referenced_objects", [])))


def set_nprobe(replica: Replica, nprobe: int | None) -> None:
    """Carry the master's nprobe to an IVF replica (GPU indexes keep their own copy)."""
    if nprobe is None or not hasattr(faiss, "GpuParameterSpace"):
        return
    try:
        faiss.GpuParameterSpace().set_index_parameter(replica.index, "nprobe", int(nprobe))
    except Exception:  # not an IVF replica: nothing to set
        logger.debug("could not set nprobe on the GPU replica", exc_info=True)
