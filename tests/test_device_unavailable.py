"""A device this PyTorch cannot run on (``--device cuda`` on a CPU-only build, ``cuda:1`` on a
one-GPU machine, ``mps`` off macOS): query, serve and ingest exited 1 with torch's own "Torch
not compiled with CUDA enabled", as if a retry could mend it. Now the encoder refuses it where
the device is resolved, naming the device, the PyTorch and what to use instead (exit 2). The
builds are simulated, so the tests say the same on a GPU machine."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import cli_env
from typer.testing import CliRunner

from htp_cli.failure import is_usage_error
from htp_cli.main import app
from htp_embed.config import EncoderSettingError
from htp_embed.models import resolve_device

runner = CliRunner()


@pytest.fixture()
def cpu_only_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)


@pytest.mark.parametrize(("device", "why"), [
    ("cuda", "built without CUDA"), ("cuda:1", "built without CUDA"), ("mps", "built without MPS"),
    ("xpu", "no XPU support"), ("xpu:1", "no XPU support"),
])
def test_a_device_this_build_lacks_is_bad_usage_naming_it(cpu_only_build, device, why):
    with pytest.raises(EncoderSettingError) as caught:
        resolve_device(device)
    message = str(caught.value)
    assert f"device {device!r} asked for" in message and why in message and torch.__version__ in message
    assert "--device cpu or auto" in message
    assert is_usage_error(caught.value)


def test_cpu_and_auto_still_resolve_without_a_gpu(cpu_only_build):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_cuda_build_without_a_visible_gpu_or_with_fewer_gpus(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(EncoderSettingError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EncoderSettingError, match=r"sees 1 CUDA GPU \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("how", ["option", "environment"])
def test_query_exits_2_on_a_device_this_build_lacks(how, cpu_only_build, index_dir, tiny_model_dir, tmp_path, monkeypatch):
    cli_env(tiny_model_dir, tmp_path, monkeypatch)
    args = ["query", "the cat", "--index", str(index_dir), "--json"]
    if how == "option":
        args += ["--device", "cuda"]
    else:
        monkeypatch.setenv("HTP_INDEX_ENCODER__DEVICE", "cuda")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert "device 'cuda' asked for" in error and "Torch not compiled" not in error


def test_the_help_lists_every_device_accepted():
    result = runner.invoke(app, ["query", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for device in ("auto", "cpu", "cuda:N", "mps", "xpu:N"):
        assert device in text


def test_info_still_reads_the_index_and_says_why_no_forward_pass_runs(cpu_only_build, index_dir, monkeypatch):
    """``info`` reads an index whatever this machine's settings say: the device refusal, raised
    where the device is resolved, became a traceback there."""
    monkeypatch.setenv("HTP_INDEX_ENCODER__DEVICE", "cuda")
    result = runner.invoke(app, ["info", "--index", str(index_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["forward_pass"].startswith("none: device 'cuda' asked for")
