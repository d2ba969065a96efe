"""How the encoder picks its CPU fast path, and that the exact float32 path stays selectable.

Speed itself is measured in benchmarks/encoder_speed.py, never asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_decoder import tiny_encoder

from htp_embed import HTPEncoder, models
from htp_embed.models import cpu_bf16_instructions, resolve_dtype

CPU = torch.device("cpu")


def test_auto_is_float32_on_a_cpu_without_native_bfloat16(monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: ())
    assert resolve_dtype("auto", CPU) == torch.float32


def test_auto_is_bfloat16_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: ("amx_bf16", "avx512_bf16"))
    assert resolve_dtype("auto", CPU) == torch.bfloat16


def test_auto_stays_float32_with_avx512_bf16_alone_where_bfloat16_measured_slower(monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: ("avx512_bf16",))
    assert resolve_dtype("auto", CPU) == torch.float32


def test_auto_is_bfloat16_on_cuda(monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: ())
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("instructions", [(), ("avx512_bf16",)])
def test_an_explicit_dtype_is_kept_whatever_the_cpu(monkeypatch, instructions):
    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: instructions)
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


def test_bfloat16_support_falls_back_to_cpuinfo_flags_without_torch_probes(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(models, "_cpuinfo_flags", lambda: {"avx512f", "avx512_bf16"})
    assert cpu_bf16_instructions() == ("avx512_bf16",)
    monkeypatch.setattr(models, "_cpuinfo_flags", lambda: {"amx_tile", "amx_bf16", "avx512_bf16"})
    assert cpu_bf16_instructions() == ("amx_bf16", "avx512_bf16")
    monkeypatch.setattr(models, "_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert cpu_bf16_instructions() == ()


def test_a_failing_probe_counts_as_unsupported(monkeypatch):
    def broken() -> bool:
        raise RuntimeError("no cpuinfo")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    monkeypatch.setattr(models, "_cpuinfo_flags", lambda: {"amx_tile", "amx_bf16", "avx512_bf16"})
    assert cpu_bf16_instructions() == ()


def test_amx_without_its_bfloat16_flag_is_not_counted(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(models, "_cpuinfo_flags", lambda: {"amx_tile", "amx_int8"})
    assert cpu_bf16_instructions() == ()


def test_float32_stays_selectable_when_loading_by_path(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: ("amx_bf16",))
    exact = HTPEncoder(model=str(tiny_model_dir), dtype="float32", segmenter="sentencizer", show_progress=False)
    fast = HTPEncoder(model=str(tiny_model_dir), dtype="auto", segmenter="sentencizer", show_progress=False)
    assert exact.dtype == torch.float32 and next(exact.model.parameters()).dtype == torch.float32
    assert fast.dtype == torch.bfloat16 and next(fast.model.parameters()).dtype == torch.bfloat16
    texts = ["the cat sat on the mat . the dog ran", "protein binds receptor"]
    a, b = exact.encode_documents(texts), fast.encode_documents(texts)
    assert a.dtype == b.dtype == np.float32
    # same encoder identity: an index built in one precision serves queries in the other
    assert exact.identity() == fast.identity()


def test_a_passed_decoder_keeps_its_precision_under_auto():
    encoder = tiny_encoder()
    assert encoder.dtype == torch.float32
    assert next(encoder.model.parameters()).dtype == torch.float32


def test_a_sibling_in_another_dtype_does_not_convert_the_shared_weights(tiny_model_dir):
    exact = HTPEncoder(model=str(tiny_model_dir), dtype="float32", segmenter="sentencizer", show_progress=False)
    before = exact.encode_documents(["the cat sat on the mat"])
    sibling = exact.with_method("vanilla", dtype="bfloat16")
    assert sibling.model is not exact.model and sibling.dtype == torch.bfloat16
    assert next(exact.model.parameters()).dtype == torch.float32
    np.testing.assert_array_equal(before, exact.encode_documents(["the cat sat on the mat"]))


def test_encoders_on_the_same_weights_share_one_loaded_model(tiny_model_dir):
    first = HTPEncoder(model=str(tiny_model_dir), dtype="float32", segmenter="sentencizer", show_progress=False)
    second = HTPEncoder(model=str(tiny_model_dir), dtype="float32", method="vanilla", show_progress=False)
    assert second.model is first.model and second.tokenizer is first.tokenizer
