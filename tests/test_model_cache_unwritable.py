"""A model cache folder this user cannot write (read-only, another user's, a file in its path).

A bare "[Errno 13] Permission denied: '.../models'" with exit 1 was all a query said, as if a
retry could mend it; and a read-only cache pre-warmed with the float32 copy alone failed every
load on a CPU that chose bfloat16, though that copy holds the same weights. Root ignores
permissions, so the folder is made unwritable by a file in its path, or by a lock that cannot
be created (the OS error a non-root user gets).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat

import filelock
import pytest
import torch
from pipeline_helpers import write_docs
from typer.testing import CliRunner

from htp_cli.failure import is_usage_error
from htp_cli.main import app
from htp_embed import models
from htp_embed.packaged_models import (
    PACKAGED_MODELS,
    DamagedCopyError,
    ModelCacheNotReadableError,
    ModelCacheNotWritableError,
    PackagedModel,
)

runner = CliRunner()


def test_a_cache_under_a_file_is_named_with_the_os_reason_and_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "cache"
    with pytest.raises(ModelCacheNotWritableError) as caught:
        models.load_model("smollm2-135m", dtype=torch.float32, cache_dir=cache)
    message = str(caught.value)
    assert str(cache / "models") in message and "Not a directory" in message
    assert "HTP_INDEX_CACHE=" in message
    assert is_usage_error(caught.value)


def test_the_cli_exits_2_on_an_unwritable_cache(tmp_path, monkeypatch):
    write_docs(tmp_path / "src")
    (tmp_path / "a-file").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTP_INDEX_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", "smollm2-135m")
    monkeypatch.setenv("HTP_INDEX_ENCODER__DTYPE", "float32")  # no dtype probe: the load fails at once
    result = runner.invoke(app, ["ingest", "src", "--index", "idx", "--json"])
    assert result.exit_code == 2, result.output
    failure = json.loads(result.stdout)
    assert "cannot write the model cache folder" in failure["error"] and "HTP_INDEX_CACHE" in failure["error"]


@pytest.fixture()
def packaged_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny decoder as a packaged model whose float32 copy is already in a cache."""
    monkeypatch.setitem(PACKAGED_MODELS, "tiny-packaged", PackagedModel(
        "tiny-packaged", "none", lambda work: pytest.fail("the float32 copy is there"), "test", (64, 128)))
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / "models" / "tiny-packaged-float32")
    return cache


def test_a_read_only_cache_with_the_float32_copy_alone_casts_it_in_memory(packaged_tiny, monkeypatch, caplog):
    writable_model, _ = models.load_model("tiny-packaged", dtype=torch.bfloat16, cache_dir=packaged_tiny)
    shutil.rmtree(packaged_tiny / "models" / "tiny-packaged-bfloat16")

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", refused)
    with caplog.at_level(logging.WARNING, logger="htp_embed.models"):
        model, tokenizer = models.load_model("tiny-packaged", dtype=torch.bfloat16, cache_dir=packaged_tiny)
    assert not (packaged_tiny / "models" / "tiny-packaged-bfloat16").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "in memory" in warnings[0] and "Permission denied" in warnings[0]
    assert next(model.parameters()).dtype == torch.bfloat16
    for (name, ours), (_, written) in zip(model.state_dict().items(), writable_model.state_dict().items(), strict=True):
        assert torch.equal(ours, written), name  # the same weights as the bfloat16 copy's
    assert torch.equal(models.mean_input_embedding(model), models.mean_input_embedding(writable_model))
    assert tokenizer("the cat sat")["input_ids"]


def test_a_missing_float32_copy_in_a_read_only_cache_is_bad_usage(packaged_tiny, monkeypatch):
    shutil.rmtree(packaged_tiny / "models" / "tiny-packaged-float32")
    monkeypatch.setattr(filelock.FileLock, "acquire",
                        lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(ModelCacheNotWritableError, match="Read-only file system"):
        models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=packaged_tiny)


@pytest.fixture()
def umask_022():
    """Umask 022, the usual one (a shared cache's files 0644, folders 0755)."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.fixture()
def convertible_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny decoder as a packaged model not converted yet (its "GGUF" loads the tiny model)."""
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setitem(PACKAGED_MODELS, "tiny-packaged", PackagedModel(
        "tiny-packaged", "none", lambda work: work / "tiny.gguf", "test", (64, 128)))
    monkeypatch.setattr(models, "_load_gguf", lambda path: (
        AutoModel.from_pretrained(str(tiny_model_dir)), AutoTokenizer.from_pretrained(str(tiny_model_dir))))
    return tmp_path / "cache"


def _modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_converted_copies_and_the_fingerprint_cache_get_the_modes_the_umask_allows(convertible_tiny, umask_022):
    # mkdtemp's 0700 folders and safetensors' 0600 weights: no other user could read a cache
    # warmed once by one user, and mkstemp's 0600 fingerprints.json made them re-hash each load
    from htp_embed import fingerprint

    models.load_model("tiny-packaged", dtype=torch.bfloat16, cache_dir=convertible_tiny)
    fingerprint._write_cache_entry(convertible_tiny / "fingerprints.json", "key", {"digest": "x"})
    modes = _modes(convertible_tiny)
    assert "models/tiny-packaged-bfloat16/model.safetensors" in modes
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (convertible_tiny / name).is_dir() else 0o644)}
    assert not wrong


def test_a_copy_this_user_cannot_read_is_named_as_such_exit_2(packaged_tiny, monkeypatch):
    weights = packaged_tiny / "models" / "tiny-packaged-float32" / "model.safetensors"
    real_access = os.access
    # root reads anything: a non-root user's view of another user's 0600 weights
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(weights) and real_access(path, mode, **kw))
    with pytest.raises(ModelCacheNotReadableError) as caught:
        models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=packaged_tiny)
    monkeypatch.undo()
    message = str(caught.value)
    assert "tiny-packaged-float32 is not readable by this user" in message and str(weights) in message
    assert "save_pretrained" not in message and "HTP_INDEX_CACHE=" in message
    assert is_usage_error(caught.value)


def test_permission_denied_reading_a_copy_names_the_folder(packaged_tiny, monkeypatch):
    folder = packaged_tiny / "models" / "tiny-packaged-float32"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "config.json"))

    monkeypatch.setattr(models, "_load_packaged_copy", denied)
    with pytest.raises(ModelCacheNotReadableError, match="tiny-packaged-float32 is not readable by this user") as caught:
        models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=packaged_tiny)
    assert is_usage_error(caught.value)


def _weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_a_truncated_packaged_copy_is_converted_again(convertible_tiny, caplog):
    # it said "save the model again (model.save_pretrained(DIR))": not the user's folder to save
    first, _ = models.load_model("tiny-packaged", dtype=torch.bfloat16, cache_dir=convertible_tiny)
    expected = _weights(first)  # copied: truncating the memory-mapped file under it is a SIGBUS
    del first
    weights = convertible_tiny / "models" / "tiny-packaged-bfloat16" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="htp_embed.models"):
        again, _ = models.load_model("tiny-packaged", dtype=torch.bfloat16, cache_dir=convertible_tiny)
    assert any("tiny-packaged-bfloat16 was damaged" in r.getMessage() for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(expected.values(), _weights(again).values(), strict=True))
    assert not list((convertible_tiny / "models").glob("*.damaged"))


def test_a_copy_missing_its_tokenizer_is_converted_again(convertible_tiny):
    models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    (convertible_tiny / "models" / "tiny-packaged-float32" / "tokenizer.json").unlink()
    _, tokenizer = models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    assert tokenizer("hello world")["input_ids"]


def test_a_damaged_copy_in_a_read_only_cache_is_named_with_the_fix(packaged_tiny, monkeypatch):
    (packaged_tiny / "models" / "tiny-packaged-float32" / "model.safetensors").write_bytes(b"\0" * 100)
    monkeypatch.setattr(filelock.FileLock, "acquire",
                        lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(DamagedCopyError) as caught:
        models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=packaged_tiny)
    message = str(caught.value)
    assert f"{packaged_tiny / 'models' / 'tiny-packaged-float32'} is damaged" in message
    assert "delete that folder" in message and "save_pretrained" not in message
    assert is_usage_error(caught.value)


def test_a_truncated_tokenizer_file_names_the_copy(packaged_tiny):
    from htp_embed.packaged_tokenizer import PackagedTokenizer

    folder = packaged_tiny / "models" / "tiny-packaged-float32"
    (folder / "tokenizer.json").write_text('{"version": "1.0", "truncat')
    with pytest.raises(DamagedCopyError, match="tiny-packaged-float32 is damaged .*tokenizer.json"):
        PackagedTokenizer.from_dir(folder)._backend()


def test_a_file_where_the_copy_goes_is_replaced_by_the_copy(convertible_tiny):
    (convertible_tiny / "models").mkdir(parents=True)
    (convertible_tiny / "models" / "tiny-packaged-float32").write_text("not a folder")
    models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    assert (convertible_tiny / "models" / "tiny-packaged-float32" / "config.json").is_file()


def test_a_folder_where_the_lock_goes_is_bad_usage_naming_it(convertible_tiny):
    (convertible_tiny / "models" / "tiny-packaged-float32.lock").mkdir(parents=True)
    with pytest.raises(ModelCacheNotWritableError, match="tiny-packaged-float32.lock") as caught:
        models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    assert is_usage_error(caught.value)


def test_the_next_conversion_removes_what_a_killed_one_left(convertible_tiny, caplog):
    # kill -9 during a first run left models/<name>-float32.XXXX/ (1 GB) and the assembled GGUF
    # (242 MB) behind, and no later run removed them
    folder = convertible_tiny / "models"
    leftovers = [folder / "tiny-packaged-float32.12345.abcd", folder / "tiny-packaged-float32.gguf-x1y2"]
    for leftover in leftovers:
        leftover.mkdir(parents=True)
        (leftover / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    other = folder / "tiny-packaged-bfloat16.777.xyz"  # another copy's: its own lock's holder removes it
    other.mkdir()
    (convertible_tiny / "tmpold").mkdir()
    (convertible_tiny / "tmpold" / "x.gguf").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.INFO, logger="htp_embed.models"):
        models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    assert not any(leftover.exists() for leftover in leftovers)
    assert other.exists() and (folder / "tiny-packaged-float32.lock").is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("tiny-packaged-float32")) == [
        "tiny-packaged-float32", "tiny-packaged-float32.lock"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("tiny-packaged-float32.12345.abcd (2 MB)" in m for m in messages)
    assert any("tmpold" in m and "delete it" in m for m in messages)


def test_two_runs_finding_one_damaged_copy_keep_the_copy_converted_again(convertible_tiny, monkeypatch, caplog):
    # Two queries hit one truncated copy at once: the first moved it aside and converted it
    # again; the second, whose read failed as the copy went, then deleted that fresh copy
    # while the first was loading it, and the first failed (exit 2, "delete that folder").
    models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    folder = convertible_tiny / "models" / "tiny-packaged-float32"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    real_tokenizer = models._load_packaged_tokenizer
    first_run = {}

    def second_run_reads_while_the_first_runs(path):
        if not first_run:  # the second run has started reading the damaged copy: the first runs now
            first_run["loaded"] = None
            first_run["loaded"] = models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
            first_run["written"] = (folder / "config.json").stat().st_ino
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path / "tokenizer.json"))
        return real_tokenizer(path)

    monkeypatch.setattr(models, "_load_packaged_tokenizer", second_run_reads_while_the_first_runs)
    with caplog.at_level(logging.WARNING, logger="htp_embed.models"):
        models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    _, first_tokenizer = first_run["loaded"]
    assert first_tokenizer("hello world")["input_ids"]  # its copy is still there to read
    assert (folder / "config.json").stat().st_ino == first_run["written"]  # the first run's, not deleted


def test_a_copy_moved_aside_before_its_load_is_converted_again(convertible_tiny):
    models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)
    folder = convertible_tiny / "models" / "tiny-packaged-float32"
    shutil.rmtree(folder)  # another run found it damaged and moved it aside
    damaged = DamagedCopyError(folder, "No such file or directory")
    assert models._discard_damaged(damaged)  # nothing to discard: the next load converts it
    models.load_model("tiny-packaged", dtype=torch.float32, cache_dir=convertible_tiny)  # that other run's
    fresh = (folder / "config.json").stat().st_ino
    assert models._discard_damaged(damaged)  # not the copy this run saw: kept, and loaded
    assert (folder / "config.json").stat().st_ino == fresh
