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
    """A fake clock pair: each pass takes ``wall`` seconds, and the process gets ``share`` of
    the CPU time its threads could use (1.0 quiet, 0.5 with a neighbour on one of 2 cores)."""

    def __init__(self, threads: int = 2):
        self.now, self.cpu, self.threads, self.share = 100.0, 0.0, threads, 1.0
        self.set_calls: list[int] = []

    def governor(self, **kwargs) -> ThreadGovernor:
        kwargs = {"enabled": True, "strikes": 1, **kwargs}
        return ThreadGovernor(clock=lambda: self.now, cpu_clock=lambda: self.cpu,
                              get_threads=lambda: self.threads, set_threads=self.set_calls.append, **kwargs)

    def run(self, governor: ThreadGovernor, wall: float = 0.02) -> int:
        with governor.forward_pass() as threads:
            self.now += wall
            self.cpu += wall * threads * (self.share if threads > 1 else 1.0)
        return threads


def test_all_threads_while_the_cores_are_free():
    machine = Machine()
    governor = machine.governor()
    assert [machine.run(governor) for _ in range(5)] == [2] * 5
    assert machine.set_calls == [] and governor.single_thread_passes == 0


def test_a_contended_pass_sends_the_next_passes_to_one_thread_then_all_threads_are_tried_again():
    machine = Machine()
    governor = machine.governor(hold_s=5.0)
    machine.share = 0.5  # a neighbour holds one of the two cores
    assert machine.run(governor) == 2
    assert governor.contended()
    assert machine.run(governor) == 1
    assert machine.set_calls == [1, 2]  # one thread for the pass, all of them restored after
    machine.now += 5.0
    machine.share = 1.0  # the neighbour has gone
    assert machine.run(governor) == 2
    assert not governor.contended()
    assert machine.run(governor) == 2
    assert governor.single_thread_passes == 1


def test_one_low_pass_is_not_enough_by_default():
    machine = Machine()
    governor = machine.governor(strikes=2)
    machine.share = 0.5
    assert machine.run(governor) == 2
    assert not governor.contended()
    machine.share = 1.0
    assert machine.run(governor) == 2  # a quiet pass in between starts the count again
    machine.share = 0.5
    assert [machine.run(governor) for _ in range(3)] == [2, 2, 1]


def test_threads_that_do_not_spin_are_never_judged():
    machine = Machine()
    machine.share = 0.6  # what sleeping threads give a query on a quiet machine
    governor = machine.governor(enabled=False)
    assert [machine.run(governor) for _ in range(4)] == [2] * 4
    assert ThreadGovernor().enabled == spinning()
    assert not spinning({"OMP_WAIT_POLICY": "passive"}) and not spinning({"GOMP_SPINCOUNT": "0"})
    assert spinning({"GOMP_SPINCOUNT": str(SPIN_COUNT)}) and spinning({})


def test_a_lasting_neighbour_doubles_the_hold_up_to_its_bound():
    machine = Machine()
    governor = machine.governor(hold_s=5.0, max_hold_s=12.0)
    machine.share = 0.5
    assert machine.run(governor) == 2  # contended: the first hold starts
    holds = []
    for _ in range(4):
        began = machine.now
        while machine.run(governor) == 1:
            pass  # the loop ends with the retry on all threads, still contended
        holds.append(machine.now - began)
    # each hold ends with the first pass that starts after it (0.02 s passes)
    assert [round(h) for h in holds] == [5, 10, 12, 12]


def test_short_passes_and_single_thread_processes_are_left_alone():
    machine = Machine()
    machine.share = 0.3
    governor = machine.governor(min_pass_s=0.005)
    machine.run(governor, wall=0.001)
    assert not governor.contended()
    machine.threads = 1
    single = machine.governor()
    assert machine.run(single) == 1 and not single.contended() and machine.set_calls == []


def test_the_thread_count_is_restored_when_a_pass_fails():
    machine = Machine()
    governor = machine.governor()
    machine.share = 0.5
    machine.run(governor)
    with pytest.raises(RuntimeError), governor.forward_pass():
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
    encoder.threads._single_until = encoder.threads.clock() + 60  # as after a contended pass
    vectors = encoder.encode_documents(texts)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == full
    assert encoder.threads.single_thread_passes >= 1
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
