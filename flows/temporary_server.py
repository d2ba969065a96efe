"""The temporary Prefect server of an ad-hoc flow run, bound to the process that started it.

Without ``PREFECT_API_URL`` Prefect runs a flow against a temporary server: a uvicorn child
process it stops at exit. A run killed with SIGKILL (the OOM killer, a supervisor's timeout,
``kill -9``) never reaches that exit, and the server lived on, holding ~230 MB and a port,
one more for every killed run. On Linux the server started here asks the kernel to send it
SIGTERM when the process that started it dies, however it dies.

Two more things need the flow's own server started before the run: a local Dask cluster's
workers must report to it rather than each start one (:func:`temporary_prefect_api` names it
in the settings Prefect sends with every task), and the server must be started by a thread that
lives as long as the process, since the kernel's signal follows the *thread* that forked the
server (so it is bound only when started from the main thread).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Run by the server's interpreter before uvicorn: ask for SIGTERM when the parent dies, then
# check that the parent did not die before asking (the signal would never come).
_DIE_WITH_PARENT = (
    "import ctypes, os, runpy, signal, sys\n"
    "parent = int(sys.argv.pop(1))\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(0)\n"
    "sys.argv[0] = 'uvicorn'\n"
    "runpy.run_module('uvicorn', run_name='__main__', alter_sys=True)\n"
)


def can_bind_to_parent() -> bool:
    """Whether a server started now would die with this process: Linux, from the main thread."""
    return sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()


def _server_class() -> type:
    from prefect.server.api.server import SubprocessASGIServer

    class ParentBoundServer(SubprocessASGIServer):
        """Prefect's temporary server (the same command, environment and app) that dies with
        its parent. Prefect's own client asks ``SubprocessASGIServer()`` for the server and
        gets this instance, which Prefect keeps per port."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            import prefect
            from prefect.settings import get_current_settings

            # As prefect 3.8.8's SubprocessASGIServer._run_uvicorn_command, with the guard first.
            return subprocess.Popen(
                args=[
                    sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()),
                    "--app-dir", str(prefect.__module_path__.parent),
                    "--factory", "prefect.server.api.server:create_app",
                    "--host", "127.0.0.1", "--port", str(self.port),
                    "--log-level", "error", "--lifespan", "on",
                ],
                # Its own session: a terminal's Ctrl-C goes to the command's process group, and
                # the server, killed with it, left the flow retrying its reports for ~140 s
                # before exiting 1. The command stops it at exit, or the kernel at its death.
                start_new_session=True,
                env={
                    **os.environ,
                    "PREFECT_UI_ENABLED": "0",
                    "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1",
                    **get_current_settings().to_environment_variables(exclude_unset=True),
                },
            )

    return ParentBoundServer


def start_temporary_server() -> Any:
    """Start (or get, if this process already runs one) the temporary server Prefect's client
    would start for a run without ``PREFECT_API_URL``, bound to this process where it can be."""
    from prefect.server.api.server import SubprocessASGIServer

    server = (_server_class() if can_bind_to_parent() else SubprocessASGIServer)()
    server.start()
    return server


def _local_dask(task_runner: str | None) -> bool:
    from flows.dask_runner import parse_dask_spec

    name = task_runner or ""
    return (name == "dask" or name.startswith("dask=")) and not parse_dask_spec(name).address


@contextmanager
def temporary_prefect_api(task_runner: str | None) -> Iterator[None]:
    """Run an ad-hoc flow (no ``PREFECT_API_URL``) against a temporary server started here.

    A local Dask cluster's workers are given its address: without it each worker process would
    start its own server (seconds each, and task runs the flow's server never sees). Remote
    workers cannot reach a server on 127.0.0.1; for them set ``PREFECT_API_URL`` to one they
    can reach. With ``PREFECT_API_URL`` set, this does nothing.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    server = start_temporary_server()
    if not _local_dask(task_runner):
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield
