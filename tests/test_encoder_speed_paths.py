"""How the encoder picks its CPU fast path (measured, cached), and that the exact float32
path stays selectable.

Speed itself is measured in benchmarks/encoder_speed.py, never asserted here.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from tiny_decoder import tiny_encoder

from htp_embed import HTPEncoder, models, precision
from htp_embed.models import cpu_bf16_instructions, resolve_dtype, resolve_dtype_decision

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory for dtype decisions, and no "already logged" memory."""
    monkeypatch.setenv("HTP_INDEX_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_logged", set())
    return tmp_path


def measured(monkeypatch, speedups: dict[str, float]) -> list[tuple[int, int]]:
    """Make the probe report ``speedups``; returns the shapes it was asked to probe."""
    calls: list[tuple[int, int]] = []

    def probe(shape=precision.DEFAULT_SHAPE, *args, **kwargs):
        calls.append(tuple(shape))
        return dict(speedups)

    monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
    return calls


def test_auto_is_float32_where_bfloat16_measures_slower(cache, monkeypatch):
    # what AVX512-BF16 alone measured on an Intel CPU (0.74x): flags said "native", speed said no
    measured(monkeypatch, {"24": 0.74, "256": 0.8})
    assert resolve_dtype("auto", CPU, model="gemma3-270m") == torch.float32


def test_auto_is_bfloat16_where_it_measures_clearly_faster(cache, monkeypatch):
    # what the Zen 4 CPU of issue 21 measured (no AMX, so the old flag rule chose float32)
    calls = measured(monkeypatch, {"24": 1.75, "256": 2.17})
    decision = resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    assert decision.dtype == "bfloat16" and decision.source == "measured"
    assert calls == [(640, 2048)]  # shaped like the model's layers
    assert "1.75x at 24 tokens" in decision.reason


def test_auto_needs_a_clear_margin_on_documents(cache, monkeypatch):
    measured(monkeypatch, {"24": 2.0, "256": precision.BF16_MIN_SPEEDUP - 0.05})
    assert resolve_dtype("auto", CPU, model="gemma3-270m") == torch.float32


def test_auto_takes_bfloat16_where_queries_are_even_and_documents_clearly_faster(cache, monkeypatch):
    # what the 16-vCPU Xeon with AMX measured: the one-layer query probe at 0.92x (whole queries
    # ran even there) and documents 2.19x; one bar for both had kept float32 and given up 1.34x
    measured(monkeypatch, {"24": 0.92, "256": 2.19})
    decision = resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    assert decision.dtype == "bfloat16"
    assert ">= 1.15x on documents, >= 0.90x on queries" in decision.reason


def test_the_reason_never_rounds_a_speedup_onto_the_other_side_of_its_bar():
    # 0.8961 was printed "bfloat16 measured only 0.90x at 24 tokens ... (>= 0.90x on queries)"
    dtype, reason = precision.decide({"24": 0.8961, "256": 2.0})
    assert dtype == "float32" and "0.896x at 24 tokens" in reason and "2.00x at 256 tokens" in reason
    dtype, reason = precision.decide({"24": 0.95, "256": 1.1496})
    assert dtype == "float32" and "1.1496x at 256 tokens" in reason
    assert precision.shown_against(0.9, 0.9) == "0.90"  # on the bar passes, and says so
    assert precision.shown_against(0.8999999999999999, 0.9) == "0.8999999999999999"


def test_auto_keeps_float32_where_queries_are_clearly_slower(cache, monkeypatch):
    measured(monkeypatch, {"24": precision.BF16_MIN_QUERY_SPEEDUP - 0.05, "256": 2.19})
    assert resolve_dtype("auto", CPU, model="gemma3-270m") == torch.float32


def test_a_cached_measurement_is_decided_by_todays_rule(cache, monkeypatch):
    # a record the one-bar rule wrote: float32 for these speedups; read now, without a new probe
    calls = measured(monkeypatch, {"24": 0.92, "256": 2.19})
    resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    path = cache / precision.DECISIONS_FILE
    stored = json.loads(path.read_text())
    (record,) = stored.values()
    record.update(dtype="float32", reason="bfloat16 measured only ... (needs >= 1.15x); probe took 0.24 s")
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(precision, "_logged", set())
    again = resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    assert len(calls) == 1 and again.source == "cached"
    assert again.dtype == "bfloat16" and again.reason.endswith("; probe took 0.24 s")
    (shown,) = precision.cached_decisions_here(640)  # what `htp-index info` says agrees
    assert shown["dtype"] == "bfloat16"


def test_the_decision_is_cached_per_cpu_model_and_torch_version(cache, monkeypatch):
    calls = measured(monkeypatch, {"24": 2.0, "256": 2.0})
    first = resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    again = resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    assert len(calls) == 1 and first.source == "measured" and again.source == "cached"
    assert again.dtype == first.dtype == "bfloat16" and again.reason == first.reason
    stored = json.loads((cache / precision.DECISIONS_FILE).read_text())
    (key,) = stored
    assert precision.cpu_model() in key and f"torch {torch.__version__}" in key
    # another model's layer shape is another measurement
    resolve_dtype_decision("auto", CPU, model="smollm2-135m")
    assert calls == [(640, 2048), (576, 1536)]


def test_a_corrupt_decision_file_is_measured_again(cache, monkeypatch):
    (cache / precision.DECISIONS_FILE).write_text("{not json")
    calls = measured(monkeypatch, {"24": 0.9, "256": 0.9})
    assert resolve_dtype("auto", CPU, model="gemma3-270m") == torch.float32 and len(calls) == 1


@pytest.mark.parametrize("shape", [576, {"a": 1}, None, [640], [576, 1536], ["640", "2048"]])
def test_a_record_not_well_formed_is_skipped_by_info_and_measured_again(cache, monkeypatch, shape):
    # a hand-edited shape crashed `htp-index info` (576: 'int' object is not subscriptable), or
    # (null) hid from info a record every run used
    calls = measured(monkeypatch, {"24": 2.0, "256": 2.0})
    resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    path = cache / precision.DECISIONS_FILE
    stored = json.loads(path.read_text())
    (record,) = stored.values()
    record["shape"] = shape
    path.write_text(json.dumps(stored))
    assert precision.cached_decisions_here(640) == precision.cached_decisions_here() == []
    again = resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    assert len(calls) == 2 and again.source == "measured"  # the encoder skips it too
    (shown,) = precision.cached_decisions_here(640)  # and the new measurement replaced it
    assert shown["dtype"] == "bfloat16"


def test_the_decision_is_logged_once_per_process(cache, monkeypatch, caplog):
    measured(monkeypatch, {"24": 2.0, "256": 2.0})
    with caplog.at_level("INFO", logger="htp_embed.precision"):
        for _ in range(3):
            resolve_dtype("auto", CPU, model="gemma3-270m")
    assert sum("dtype auto" in record.getMessage() for record in caplog.records) == 1


def test_auto_is_bfloat16_on_cuda(cache, monkeypatch):
    calls = measured(monkeypatch, {"24": 0.5, "256": 0.5})
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16 and not calls


@pytest.mark.parametrize("speedup", [0.5, 3.0])
def test_an_explicit_dtype_is_kept_whatever_the_cpu_measures(cache, monkeypatch, speedup):
    calls = measured(monkeypatch, {"24": speedup, "256": speedup})
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert not calls  # nothing is measured when nothing is to be decided


def test_a_model_too_small_for_bfloat16_to_pay_stays_float32_unmeasured(cache, monkeypatch, tiny_model_dir):
    calls = measured(monkeypatch, {"24": 3.0, "256": 3.0})
    assert models.model_shape(str(tiny_model_dir)) == (64, 128)
    decision = resolve_dtype_decision("auto", CPU, model=str(tiny_model_dir))
    assert decision.dtype == "float32" and decision.source == "not measured" and not calls


def write_gguf_header(path, feed_forward: int | list[int] = 1536) -> str:
    """A GGUF file's header as SmolLM2-135M's reads (576-d, 1536-wide MLP), behind what a real
    one holds too: a tokenizer's arrays and a long chat template."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template("{{ messages }}" * 5000)
    writer.add_token_list([f"token{i}" for i in range(1000)])
    writer.add_token_scores([0.0] * 1000)
    writer.add_embedding_length(576)
    if isinstance(feed_forward, int):
        writer.add_feed_forward_length(feed_forward)
    else:
        writer.add_array("llama.feed_forward_length", feed_forward)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return str(path)


def test_a_gguf_model_is_probed_at_its_own_layer_shape(cache, monkeypatch, tmp_path):
    # Gemma's 640x2048 was probed for every .gguf file, and `htp-index info` then said
    # "not measured yet" for its 576-d index
    calls = measured(monkeypatch, {"24": 2.0, "256": 2.0})
    model = write_gguf_header(tmp_path / "smol.gguf")
    assert models.model_shape(model) == (576, 1536)
    resolve_dtype_decision("auto", CPU, model=model)
    assert calls == [(576, 1536)]
    (shown,) = precision.cached_decisions_here(576)  # what info shows for its index
    assert shown["dtype"] == "bfloat16"


def test_a_gguf_header_without_one_layer_shape_gives_none(tmp_path):
    assert models.model_shape(write_gguf_header(tmp_path / "per-layer.gguf", [1536, 2048])) is None
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 30)
    assert models.model_shape(str(tmp_path / "broken.gguf")) is None
    assert models.model_shape(str(tmp_path / "missing.gguf")) is None


def test_the_real_probe_is_short_and_reports_every_length():
    began = time.perf_counter()
    speedups = precision.probe_bf16_speedup((256, 512), lengths=(8, 64), repeats=3)
    assert set(speedups) == {"8", "64"} and all(value > 0 for value in speedups.values())
    assert time.perf_counter() - began < 5  # generous: the cores may be shared


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


def test_float32_stays_selectable_when_loading_by_path(tiny_model_dir, monkeypatch, cache):
    measured(monkeypatch, {"24": 2.0, "256": 2.0})
    monkeypatch.setattr(precision, "MIN_PROBED_HIDDEN", 1)  # let the tiny model be measured
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


def test_info_reads_the_cached_decision_without_torch_or_measuring(cache, monkeypatch):
    measured(monkeypatch, {"24": 2.0, "256": 2.0})
    resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    (found,) = precision.cached_decisions_here(640)
    assert found["dtype"] == "bfloat16" and "2.00x" in found["reason"]
    assert precision.cached_decisions_here(576) == []  # another model width: not measured yet


@pytest.fixture
def settings_here(tmp_path, monkeypatch):
    """A working folder without a settings file, the encoder on the CPU."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTP_INDEX_ENCODER__DEVICE", "cpu")


def test_info_reads_the_decisions_from_the_cache_folder_the_settings_name(cache, settings_here, monkeypatch, tmp_path):
    # info read HTP_INDEX_CACHE's folder while the encoder probed into [encoder] cache_dir
    from htp_cli.main import _dtype_auto

    measured(monkeypatch, {"24": 2.0, "256": 2.0})
    monkeypatch.setenv("HTP_INDEX_ENCODER__CACHE_DIR", str(tmp_path / "settings-cache"))
    resolve_dtype_decision("auto", CPU, model="gemma3-270m", cache_dir=tmp_path / "settings-cache")
    shown = _dtype_auto(640)
    assert shown["decisions"][0]["dtype"] == "bfloat16"
    assert shown["runs"].startswith("bfloat16: auto's decision measured on this CPU")
    monkeypatch.delenv("HTP_INDEX_ENCODER__CACHE_DIR")
    assert "decisions" not in _dtype_auto(640)  # HTP_INDEX_CACHE's folder holds none


def test_info_says_a_dtype_setting_overrides_auto(cache, settings_here, monkeypatch):
    from htp_cli.main import _dtype_auto

    measured(monkeypatch, {"24": 2.0, "256": 2.0})
    resolve_dtype_decision("auto", CPU, model="gemma3-270m")
    monkeypatch.setenv("HTP_INDEX_ENCODER__DTYPE", "float32")
    shown = _dtype_auto(640)
    assert shown["decisions"][0]["dtype"] == "bfloat16"  # auto's, still shown
    assert shown["runs"] == "float32: set by the encoder setting dtype, which overrides auto's decisions"
    monkeypatch.setenv("HTP_INDEX_ENCODER__DTYPE", "auto")
    assert _dtype_auto(64)["runs"].startswith("float32: hidden size 64 < 256")  # never probed


def test_short_texts_are_batched_by_tokens_and_keep_their_vectors():
    encoder = tiny_encoder(batch_size=2)
    texts = [f"the cat sat on the mat number w{i} . the dog ran" for i in range(8)]
    one_by_one = np.concatenate([encoder.encode_queries([text]) for text in texts])
    real = encoder._embed_layouts
    sizes: list[int] = []

    def counted(layouts, **options):
        sizes.append(len(layouts))
        return real(layouts, **options)

    encoder._embed_layouts = counted
    batched = encoder.encode_queries(texts)
    assert sizes == [8]  # 8 short texts fit 2 x SHORT_BATCH_WIDTH positions: one pass
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_long_texts_keep_the_batch_size():
    encoder = tiny_encoder(batch_size=2, max_length=512)
    texts = [" ".join(["the cat sat on the mat ."] * 30)] * 4  # ~210 positions each
    real = encoder._embed_layouts
    sizes: list[int] = []

    def counted(layouts, **options):
        sizes.append(len(layouts))
        return real(layouts, **options)

    encoder._embed_layouts = counted
    encoder.encode_documents(texts)
    assert sizes == [2, 2]
