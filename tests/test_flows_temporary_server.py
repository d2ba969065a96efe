"""The temporary Prefect server of an ad-hoc flow run: local Dask workers are told where it is,
and a real one dies with the process that started it, even under SIGKILL, and outlives a
Ctrl-C only as long as the command does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flows import temporary_server
from flows.temporary_server import can_bind_to_parent, temporary_prefect_api


def test_local_workers_are_given_the_flows_temporary_prefect_server(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = []

    class FakeServer:
        api_url = "http://127.0.0.1:9/api"

    monkeypatch.setattr(temporary_server, "start_temporary_server", lambda: started.append(1) or FakeServer())
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        for name in ("dask", "dask=2"):
            with temporary_prefect_api(name):
                assert PREFECT_API_URL.value() == FakeServer.api_url
        for name in ("thread", None, "dask=tcp://10.0.0.5:8786"):  # remote workers could not reach it
            with temporary_prefect_api(name):
                assert not PREFECT_API_URL.value()
        assert len(started) == 5  # every ad-hoc run gets the server that dies with it
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect:4200/api"}), temporary_prefect_api("dask"):
        assert PREFECT_API_URL.value() == "http://prefect:4200/api"  # a real server is kept
    assert len(started) == 5


def test_only_the_main_thread_binds_a_server_to_the_process():
    """The kernel's parent-death signal follows the thread that forked the server: one started
    from a worker thread would die with that thread, under a process that still uses it."""
    seen = []
    worker = threading.Thread(target=lambda: seen.append(can_bind_to_parent()))
    worker.start()
    worker.join()
    assert seen == [False]
    assert can_bind_to_parent() is sys.platform.startswith("linux")


FLOW_THEN_WAIT = textwrap.dedent(
    """
    import os, sys, time
    from prefect import flow
    from prefect.server.api.server import SubprocessASGIServer
    from flows.temporary_server import temporary_prefect_api

    @flow
    def waits() -> None:
        server = SubprocessASGIServer()  # what Prefect's own client asks for
        print(type(server).__name__, server.server_process.pid, server.api_url, flush=True)
        time.sleep(600)

    with temporary_prefect_api("thread"):
        waits()
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.server
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_or_interrupted_ad_hoc_run_takes_its_temporary_server_with_it(tmp_path):
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=os.pathsep.join(sys.path),
               # Prefect waits 20 s for its temporary server by default: on a loaded 2-core CI
               # machine the run once gave up first ("Timed out while attempting to connect")
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    for stop in (signal.SIGKILL, signal.SIGINT):
        # its own process group, as a command in a terminal has: Ctrl-C goes to the whole group
        said = tmp_path / f"run-{stop.name}.log"  # what the run logged, for the message of a failure
        # Ctrl-C as a terminal delivers it: SIGINT at its default. A test run started in the
        # background of a non-interactive shell (`make test &`) hands its children SIGINT
        # ignored, and the run then never saw the signal.
        run = subprocess.Popen([sys.executable, "-c", FLOW_THEN_WAIT], env=env, cwd=tmp_path, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=said.open("w"), text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            line = run.stdout.readline().split()
            assert line and line[0] == "ParentBoundServer", f"the flow did not start: {line}"
            server_pid, api_url = int(line[1]), line[2]
            assert httpx.get(f"{api_url}/health", timeout=10).status_code == 200  # a real server, in use
            # Ctrl-C reached the server too, in the command's group: the flow then retried its
            # reports to a dead server for ~140 s before it exited
            assert os.getsid(server_pid) != os.getsid(run.pid)
            os.killpg(run.pid, stop)
            # ~1 s when quiet; a busy 2-core CI once took over 30 s to report the crash and
            # drain Prefect's events. The bug this guards against took ~140 s.
            try:
                run.wait(timeout=75)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the run stopped with {stop.name} did not exit in 75 s; it logged:\n"
                            + "\n".join(said.read_text(errors="replace").splitlines()[-40:]))
            deadline = time.monotonic() + 30
            while _alive(server_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _alive(server_pid), f"the temporary server outlived the run stopped with {stop.name}"
        finally:
            run.kill()
            run.wait()
