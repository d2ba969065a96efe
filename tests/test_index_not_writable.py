"""A writer on an index folder this user cannot write: ingest, rebuild, compact, restore and
migrate said a bare "[Errno 13] Permission denied: '.../.ingest.lock'" with exit 1, as if a
retry could mend it (a rebuild drew its progress bar first). Now one message names the folder
and the lock file, with exit 2. Root ignores permissions, so the lock file's open is refused
the way it is for another user (EACCES), and a real read-only folder is tried where the tests
do not run as root."""

from __future__ import annotations

import builtins
import errno
import json
import os

import pytest
from pipeline_helpers import cli_env, write_docs
from typer.testing import CliRunner

import pipelines.lock
from htp_cli.failure import is_usage_error
from htp_cli.main import app
from pipelines.errors import IndexNotWritableError
from pipelines.lock import LOCK_NAME, index_lock

runner = CliRunner()
COMMANDS = (["ingest", "src"], ["rebuild"], ["compact"], ["restore", "--version", "1"], ["migrate"])


def _refuse_lock_files(monkeypatch) -> None:
    """Opening the writer lock file fails as it does in another user's folder (FileLock opens
    it with os.open; check_writable with open)."""
    real_os_open, real_open = os.open, builtins.open

    def refused(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pipelines.lock.os, "open", lambda path, *a, **k: refused(path) if str(path).endswith(LOCK_NAME) else real_os_open(path, *a, **k))
    monkeypatch.setattr(pipelines.lock, "open", lambda path, *a, **k: refused(path) if str(path).endswith(LOCK_NAME) else real_open(path, *a, **k), raising=False)


def test_the_lock_error_names_the_folder_and_the_lock_file(tmp_path, monkeypatch):
    _refuse_lock_files(monkeypatch)
    with pytest.raises(IndexNotWritableError) as caught, index_lock(tmp_path, 1.0):
        pass
    message = str(caught.value)
    assert f"cannot take the writer lock on {tmp_path}" in message and "not writable" in message
    assert str(tmp_path / LOCK_NAME) in message and "Permission denied" in message
    assert is_usage_error(caught.value)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_writer_exits_2_on_an_index_folder_it_cannot_write(command, index_dir, tiny_model_dir, tmp_path, monkeypatch):
    cli_env(tiny_model_dir, tmp_path, monkeypatch)
    write_docs(tmp_path / "src")
    _refuse_lock_files(monkeypatch)
    result = runner.invoke(app, [*command, "--index", str(index_dir), "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert f"cannot take the writer lock on {index_dir}" in error and LOCK_NAME in error


def test_rebuild_fails_before_drawing_its_progress_bar(index_dir, tiny_model_dir, tmp_path, monkeypatch):
    cli_env(tiny_model_dir, tmp_path, monkeypatch)
    _refuse_lock_files(monkeypatch)
    result = runner.invoke(app, ["rebuild", "--index", str(index_dir)])
    assert result.exit_code == 2, result.output
    assert "re-embedding nodes" not in result.output and "cannot take the writer lock" in result.output


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes a read-only folder anyway")
def test_a_truly_read_only_folder_is_refused_the_same_way(index_dir):
    (index_dir / LOCK_NAME).unlink(missing_ok=True)
    index_dir.chmod(0o555)
    try:
        with pytest.raises(IndexNotWritableError), index_lock(index_dir, 1.0):
            pass
    finally:
        index_dir.chmod(0o755)
