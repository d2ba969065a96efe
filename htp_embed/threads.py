"""How the encoder's OpenMP threads wait, and how many it uses: fast while the cores are the
process's own, safe when another process takes one.

Why: a forward pass is hundreds (a query) to thousands (a batch of documents) of parallel
regions, most of them short. Between regions, OpenMP's worker threads either sleep
(``OMP_WAIT_POLICY=PASSIVE``) or spin for a while.

* Sleeping costs a wake-up per region. On 2 cores (AMD EPYC Zen 4, side by side in one run of
  ``benchmarks/openmp_waiting.py``) a single query took 33.1 ms p50 with sleeping threads and
  24.9 ms with a bounded spin (``GOMP_SPINCOUNT`` = `SPIN_COUNT`), and bfloat16 documents ran
  1.59x float32 against 1.73x.
* Spinning is a hazard when another process holds a core: a thread spins while the one it
  waits for is descheduled. Beside a busy-looping process, the same spin without a guard made a
  query take 82.9 ms against 38.7 ms sleeping (libgomp's default spin, 30x longer, once made a
  batch 13x slower).

So the spin is bounded and set before OpenMP loads (:func:`default_openmp_waiting`; an explicit
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` wins), and :class:`ThreadGovernor` watches each
forward pass: when the process got markedly less CPU time than its threads could use, another
process has a core, and the following passes run on one thread (no waiting at all) for a
while, then try all threads again: beside the busy process, 35.8 ms a query (documents 15%
slower than sleeping threads: the price of the quiet case). Figures:
``benchmarks/results/openmp_waiting.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Spins before a waiting OpenMP thread sleeps (libgomp's default is 300,000): long enough to
#: bridge the gaps between a forward pass's regions, short enough that a spinner gives its core
#: back within a fraction of a millisecond.
SPIN_COUNT = 10_000


def default_openmp_waiting(environ: MutableMapping[str, str] = os.environ) -> None:
    """Bound OpenMP's spinning unless the user chose how threads wait. Takes effect only if it
    runs before torch or faiss loads OpenMP, which reads the environment once."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


def spinning(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether OpenMP's waiting threads spin at all (not with ``OMP_WAIT_POLICY=PASSIVE`` or
    ``GOMP_SPINCOUNT=0``): without a spin there is nothing for :class:`ThreadGovernor` to guard."""
    return (environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"
            and environ.get("GOMP_SPINCOUNT", "").strip() not in ("0", "0.0"))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@dataclass
class ThreadGovernor:
    """Runs forward passes on all of torch's threads, or on one while that is measured faster
    (another process holding a core).

    Suspicion: this process got less than ``min_efficiency`` of the CPU time its threads could
    have used, in ``strikes`` passes in a row. Spinning threads count as busy, so on a quiet
    machine a pass gets 0.84-0.99 of it (2 cores, queries and documents alike) and beside a busy
    process 0.47-0.52. But libgomp also stops spinning on its own once a process has more OpenMP
    threads than cores (a second thread running passes brings its own team), and sleeping
    threads give 0.6-0.87 with no neighbour at all. So suspicion alone changes nothing: the next
    pass runs on one thread as a trial, and its time per position is compared with recent passes
    of a similar size on all threads. One thread is kept for ``hold_s`` only where it measured at
    least ``1 / trial_margin`` as fast; otherwise no trial is made for ``hold_s``. Each hold that
    ends the same way doubles the next (up to ``max_hold_s``), so a lasting neighbour, or a
    process that sleeps its threads, costs a trial or two slow passes every two minutes at most.

    Passes shorter than ``min_pass_s`` are not judged: a quiet query (18-25 ms on 2 cores) seldom
    is, and a pass on another number of threads can round differently in the last bits (as
    passes over different batches do), so a trial is kept for where it can pay. Where threads never
    spin (``enabled`` False, see :func:`spinning`) there is no hazard and every pass runs on all
    threads. Not thread-safe on its own: the encoder runs passes under its model's lock.
    """

    enabled: bool = field(default_factory=spinning)
    min_efficiency: float = 0.7
    strikes: int = 2
    trial_margin: float = 0.9
    hold_s: float = 5.0
    max_hold_s: float = 120.0
    min_pass_s: float = 0.02
    clock: Callable[[], float] = time.perf_counter
    cpu_clock: Callable[[], float] = time.process_time
    get_threads: Callable[[], int] = _torch_threads
    set_threads: Callable[[int], None] = _set_torch_threads
    #: Passes run on one thread: trials, and those of a hold that a trial measured faster.
    single_thread_passes: int = 0
    _single_until: float = field(default=float("-inf"), repr=False)
    _calm_until: float = field(default=float("-inf"), repr=False)
    _trial: bool = field(default=False, repr=False)
    _low_passes: int = field(default=0, repr=False)
    _hold: float | None = field(default=None, repr=False)
    _recent: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=8), repr=False)

    def contended(self) -> bool:
        """Whether the next pass runs on one thread (a hold, or a trial)."""
        return self._trial or self.clock() < self._single_until

    @contextlib.contextmanager
    def forward_pass(self, positions: int) -> Iterator[int]:
        """Around one forward pass over ``positions`` token positions: sets the thread count for
        it (and restores it after); yields the count used."""
        full = self.get_threads()
        threads = 1 if full > 1 and self.contended() else full
        trial, self._trial = self._trial and threads == 1, False
        if threads != full:
            self.set_threads(threads)
            self.single_thread_passes += 1
        began, cpu_began = self.clock(), self.cpu_clock()
        try:
            yield threads
        finally:
            wall, cpu = self.clock() - began, self.cpu_clock() - cpu_began
            if threads != full:
                self.set_threads(full)
        # only a pass that finished is judged
        if trial:
            self._settle(positions, wall)
        elif threads > 1:
            self._judge(threads, positions, wall, cpu)

    def _judge(self, threads: int, positions: int, wall: float, cpu: float) -> None:
        if not self.enabled or wall < self.min_pass_s or positions < 1:
            return
        self._recent.append((positions, wall))
        if cpu / (wall * threads) >= self.min_efficiency:
            self._low_passes, self._hold = 0, None
            return
        if self.clock() < self._calm_until:  # a trial found all threads faster a moment ago
            return
        self._low_passes += 1
        if self._low_passes >= self.strikes:
            self._low_passes = 0
            self._trial = True

    def _settle(self, positions: int, wall: float) -> None:
        """After a trial on one thread: hold it where it was faster than all threads on passes
        of a similar size, else leave all threads alone for a while."""
        similar = sorted(w / p for p, w in self._recent if positions / 1.5 <= p <= positions * 1.5)
        if not similar or positions < 1 or wall < self.min_pass_s:
            return
        reference = similar[len(similar) // 2]
        hold = self.hold_s if self._hold is None else min(self._hold * 2, self.max_hold_s)
        self._hold = hold
        if wall / positions <= reference * self.trial_margin:
            self._single_until = self.clock() + hold
            log.info("one thread ran a forward pass %.1fx as fast as all of them (another process is "
                     "using the cores); embedding on 1 thread for %.0f s", reference * positions / wall, hold)
        else:
            self._calm_until = self.clock() + hold
            self._recent.clear()  # measured under the old conditions; the next suspicion measures anew
