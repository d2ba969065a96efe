"""How OpenMP waits and how many threads a forward pass gets (htp_embed.threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_decoder import tiny_encoder

from htp_embed.threads import SPIN_COUNT, ThreadGovernor, default_openmp_waiting, spinning

ROOT = Path(__file__).resolve().parents[1]


class Machine:
    """A fake machine of 2 cores. A pass of ``positions`` costs ``cost[threads]`` seconds per
    position, and the process gets ``share`` of the CPU time its threads could use.

    quiet: all threads 2x as fast as one, nearly all the CPU time; ``busy()``: a neighbour on one
    core, spinning threads slower than one and half the CPU time; ``sleepy()``: no neighbour,
    but threads that sleep (libgomp's throttled spin): little CPU time, all threads still faster.
    """

    def __init__(self, threads: int = 2):
        self.now, self.cpu, self.threads = 100.0, 0.0, threads
        self.cost, self.share = {1: 0.002, 2: 0.001}, 0.95
        self.set_calls: list[int] = []

    def busy(self) -> None:
        self.cost, self.share = {1: 0.002, 2: 0.005}, 0.5

    def sleepy(self) -> None:
        self.cost, self.share = {1: 0.002, 2: 0.0011}, 0.6

    def quiet(self) -> None:
        self.cost, self.share = {1: 0.002, 2: 0.001}, 0.95

    def governor(self, **kwargs) -> ThreadGovernor:
        kwargs = {"enabled": True, "min_pass_s": 0.005, **kwargs}
        return ThreadGovernor(clock=lambda: self.now, cpu_clock=lambda: self.cpu,
                              get_threads=lambda: self.threads, set_threads=self.set_calls.append, **kwargs)

    def run(self, governor: ThreadGovernor, positions: int = 20) -> int:
        with governor.forward_pass(positions) as threads:
            wall = positions * self.cost[threads]
            self.now += wall
            self.cpu += wall * threads * (self.share if threads > 1 else 1.0)
        return threads


def test_all_threads_while_the_cores_are_free():
    machine = Machine()
    governor = machine.governor()
    assert [machine.run(governor) for _ in range(5)] == [2] * 5
    assert machine.set_calls == [] and governor.single_thread_passes == 0


def test_a_neighbour_is_confirmed_by_a_trial_then_one_thread_is_held_and_all_are_tried_again():
    machine = Machine()
    governor = machine.governor(hold_s=5.0)
    machine.busy()
    # two passes with little CPU time, then a trial on one thread, faster: held
    assert [machine.run(governor) for _ in range(5)] == [2, 2, 1, 1, 1]
    assert machine.set_calls[:2] == [1, 2]  # one thread for the pass, all of them restored after
    assert governor.contended()
    machine.now += 5.0
    machine.quiet()  # the neighbour has gone
    assert [machine.run(governor) for _ in range(4)] == [2] * 4
    assert not governor.contended()


def test_threads_that_sleep_without_a_neighbour_keep_all_threads_after_one_trial():
    machine = Machine()
    governor = machine.governor(hold_s=5.0)
    machine.sleepy()
    threads = [machine.run(governor) for _ in range(40)]
    assert threads[:3] == [2, 2, 1]  # the trial: one thread measured slower
    assert threads[3:] == [2] * 37  # 40 passes of 22 ms: no second trial within the calm hold
    machine.now += 5.0
    assert [machine.run(governor) for _ in range(3)] == [2, 2, 1]  # suspicion measured anew


def test_one_low_pass_is_not_enough_by_default():
    machine = Machine()
    governor = machine.governor(strikes=2)
    machine.busy()
    assert machine.run(governor) == 2
    assert not governor.contended()
    machine.quiet()
    assert machine.run(governor) == 2  # a quiet pass in between starts the count again
    machine.busy()
    assert [machine.run(governor) for _ in range(3)] == [2, 2, 1]


def test_threads_that_do_not_spin_are_never_judged():
    machine = Machine()
    machine.busy()
    governor = machine.governor(enabled=False)
    assert [machine.run(governor) for _ in range(4)] == [2] * 4
    assert ThreadGovernor().enabled == spinning()
    assert not spinning({"OMP_WAIT_POLICY": "passive"}) and not spinning({"GOMP_SPINCOUNT": "0"})
    assert spinning({"GOMP_SPINCOUNT": str(SPIN_COUNT)}) and spinning({})


def test_a_lasting_neighbour_doubles_the_hold_up_to_its_bound():
    machine = Machine()
    governor = machine.governor(hold_s=5.0, max_hold_s=12.0)
    machine.busy()
    holds = []
    for _ in range(4):
        while machine.run(governor) != 1:
            pass  # slow passes on all threads until the trial
        began = machine.now
        while machine.run(governor) == 1:
            pass
        holds.append(machine.now - began)
    # each hold ends with the first pass that starts after it
    assert [round(h) for h in holds] == [5, 10, 12, 12]


def test_a_trial_without_passes_of_a_similar_size_decides_nothing():
    machine = Machine()
    governor = machine.governor()
    machine.busy()
    machine.run(governor, positions=20)
    machine.run(governor, positions=20)
    assert machine.run(governor, positions=400) == 1  # the trial, on a pass 20x the size
    assert not governor.contended()
    assert machine.run(governor, positions=400) == 2


def test_short_passes_and_single_thread_processes_are_left_alone():
    machine = Machine()
    machine.busy()
    governor = machine.governor(min_pass_s=0.5)
    assert [machine.run(governor) for _ in range(4)] == [2] * 4  # 0.1 s passes: too short to judge
    machine.threads = 1
    single = machine.governor()
    assert machine.run(single) == 1 and not single.contended()


def test_the_thread_count_is_restored_when_a_pass_fails():
    machine = Machine()
    governor = machine.governor()
    machine.busy()
    machine.run(governor)
    machine.run(governor)
    with pytest.raises(RuntimeError), governor.forward_pass(20):
        raise RuntimeError("out of memory")
    assert machine.set_calls == [1, 2]


def test_bounded_spin_is_the_default_unless_the_user_chose_how_threads_wait():
    environ: dict[str, str] = {}
    default_openmp_waiting(environ)
    assert environ == {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        environ = dict(chosen)
        default_openmp_waiting(environ)
        assert environ == chosen


@pytest.mark.parametrize("module", ["htp_embed", "htp_cli.main"])
def test_importing_the_package_or_the_command_sets_it_before_torch_loads(module):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = f"import os, sys, {module}; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(SPIN_COUNT), "False"]


def test_the_encoder_runs_a_contended_pass_on_one_thread_with_the_same_vectors(monkeypatch):
    encoder = tiny_encoder()
    texts = ["A first sentence. And a second one.", "Another text here."]
    expected = encoder.encode_documents(texts)
    seen: list[int] = []
    real_forward = encoder.model.forward

    def forward(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", forward)
    full = torch.get_num_threads()
    encoder.threads._single_until = encoder.threads.clock() + 60  # as after a trial measured one thread faster
    vectors = encoder.encode_documents(texts)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == full
    assert encoder.threads.single_thread_passes >= 1
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
