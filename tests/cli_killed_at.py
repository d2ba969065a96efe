"""Run the real ``htp-index`` command, SIGKILLed at one step of publishing a version.

``python tests/cli_killed_at.py STEP ARGS...`` runs ``htp-index ARGS...`` unchanged except
that the process sends itself SIGKILL at ``STEP``:

* ``staging-created``: just after the folder a new version is staged in (``versions/.tmp-…``)
  is created, before anything is written into it;
* ``staging-complete``: just before that folder, with its sealed manifest, is renamed into
  place, the last step before the version could be made live.

A parent polling for the staging folder can miss it (it lives for milliseconds); arming the
step in the writer itself lands the kill at the same point every run.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

STEPS = ("staging-created", "staging-complete")


def _is_version_staging(path: Any) -> bool:
    path = Path(path)
    return path.name.startswith(".tmp-") and path.parent.name == "versions"


def _arm(step: str) -> None:
    if step == "staging-created":
        real_mkdtemp = tempfile.mkdtemp

        def mkdtemp(*args: Any, **kwargs: Any) -> str:
            made = real_mkdtemp(*args, **kwargs)
            if _is_version_staging(made):
                os.kill(os.getpid(), signal.SIGKILL)
            return made

        tempfile.mkdtemp = mkdtemp
    elif step == "staging-complete":
        real_rename = os.rename

        def rename(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
            if _is_version_staging(source):
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(source, target, *args, **kwargs)

        os.rename = rename
    else:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")


if __name__ == "__main__":
    _arm(sys.argv[1])
    sys.argv = ["htp-index", *sys.argv[2:]]
    runpy.run_module("htp_cli", run_name="__main__", alter_sys=True)
