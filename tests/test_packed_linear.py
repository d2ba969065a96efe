"""Linear weights packed once for oneDNN: chosen by measurement, checked against F.linear, and
never a change in what the encoder computes (speed is measured in benchmarks/linear_packing.py)."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from htp_embed import HTPEncoder, packed_linear, precision
from htp_embed import encoder as encoder_module
from htp_embed.models import decoder_layers
from htp_embed.packed_linear import (
    PackedGeluGateLinear,
    PackedLinear,
    cpu_packing_decision,
    decide,
    pack_linear_layers,
    unpack_linear_layers,
)

pytestmark = pytest.mark.skipif(packed_linear.unavailable_reason() is not None,
                                reason="this PyTorch cannot pack Linear weights")
TEXTS = ["the cat sat on the mat . the dog ran in the park", "protein binds receptor . cells grew faster"]
SHAPE = (640, 2048)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HTP_INDEX_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_logged", set())
    return tmp_path


def packed_bf16_linear() -> tuple[torch.nn.Sequential, torch.Tensor]:
    """A packed one-layer bf16 model and an input for it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24).to(torch.bfloat16))
    assert pack_linear_layers(model) == 1
    return model, torch.randn(2, 32).to(torch.bfloat16)


def assert_computes_plain(model: torch.nn.Sequential, x: torch.Tensor) -> None:
    """``model`` (one packed layer) gives what F.linear gives on its current weight."""
    with torch.inference_mode():
        expected = F.linear(x, model[0].weight, model[0].bias).float()
        assert torch.allclose(model(x).float(), expected, atol=2e-2 * float(expected.abs().max()))


def measured(monkeypatch, speedups: dict[str, float]) -> list[tuple]:
    """Make the probe report ``speedups``; returns what it was asked to probe."""
    calls: list[tuple] = []

    def probe(shape, dtype, *args, **kwargs):
        calls.append((tuple(shape), dtype))
        return dict(speedups)

    monkeypatch.setattr(packed_linear, "probe_packed_speedup", probe)
    return calls


def test_packing_needs_a_clear_gain_for_queries_and_no_loss_for_documents():
    assert decide({"24": 1.3, "256": 1.03})[0]
    assert not decide({"24": 1.05, "256": 1.2})[0]  # queries are what it is for
    assert not decide({"24": 2.0, "256": 0.9})[0]  # documents must not pay for it
    assert "1.30x at 24 tokens" in decide({"24": 1.3, "256": 1.0})[1]


def test_the_decision_is_measured_once_and_cached_per_dtype(cache, monkeypatch):
    calls = measured(monkeypatch, {"24": 1.4, "256": 1.0})
    first = cpu_packing_decision(SHAPE, torch.bfloat16, cache)
    again = cpu_packing_decision(SHAPE, torch.bfloat16, cache)
    assert first.pack and first.source == "measured" and again.source == "cached" and again.pack
    assert calls == [(SHAPE, torch.bfloat16)]
    cpu_packing_decision(SHAPE, torch.float32, cache)  # another dtype is another measurement
    assert len(calls) == 2
    stored = json.loads((cache / precision.PACKING_FILE).read_text())
    assert len(stored) == 2 and all(precision.cpu_model() in key for key in stored)
    (shown,) = [d for d in precision.cached_packing_here(cache) if d["key"].endswith("bfloat16")]
    assert shown["pack"] is True and "1.40x" in shown["reason"]


def test_a_model_too_small_to_measure_is_not_packed(cache, monkeypatch):
    calls = measured(monkeypatch, {"24": 3.0, "256": 3.0})
    decision = cpu_packing_decision((64, 128), torch.bfloat16, cache)
    assert not decision.pack and decision.source == "not measured" and not calls


def test_a_probe_that_fails_means_no_packing_not_a_failed_load(cache, monkeypatch):
    def refuses(*args, **kwargs):
        raise RuntimeError("mkldnn does not support this dtype")

    monkeypatch.setattr(packed_linear, "probe_packed_speedup", refuses)
    decision = cpu_packing_decision(SHAPE, torch.float16, cache)
    assert not decision.pack and "does not support" in decision.reason
    assert not cpu_packing_decision(SHAPE, torch.float16, cache).pack  # cached: not probed again


def test_without_the_ops_nothing_is_packed_or_measured(cache, monkeypatch):
    calls = measured(monkeypatch, {"24": 3.0, "256": 3.0})
    monkeypatch.setattr(packed_linear, "unavailable_reason", lambda: "no oneDNN here")
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert pack_linear_layers(layer) == 0 and type(layer[0]) is torch.nn.Linear
    decision = cpu_packing_decision(SHAPE, torch.bfloat16, cache)
    assert not decision.pack and decision.source == "unavailable" and not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_layer_computes_what_the_plain_one_does(dtype):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 160).to(dtype)
    model = torch.nn.Sequential(plain)
    assert pack_linear_layers(model) == 1 and isinstance(model[0], PackedLinear)
    x = torch.randn(2, 7, 96).to(dtype)
    with torch.inference_mode():
        expected = F.linear(x, plain.weight, plain.bias).float()
        got = model(x).float()
    assert torch.allclose(got, expected, atol=2e-2 * float(expected.abs().max()))
    # the same parameters under the same names: fingerprints and state_dict do not move
    assert model[0].weight is plain.weight and list(model.state_dict()) == ["0.weight", "0.bias"]


def test_calls_it_was_not_packed_for_go_to_the_plain_weight():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8).to(torch.bfloat16))
    pack_linear_layers(model)
    packed = model[0]
    x32 = torch.randn(3, 16)
    # another dtype than packed: F.linear, which refuses the mix too
    with torch.inference_mode(), pytest.raises(RuntimeError):
        model(x32)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    model(x).float().sum().backward()  # autograd: the plain weight, gradients flow
    assert x.grad is not None and packed.weight.grad is not None


def test_a_weight_changed_after_packing_is_packed_again_not_served_stale():
    model, x = packed_bf16_linear()
    with torch.no_grad():
        model[0].weight.mul_(-1.0)  # in place, as an optimiser step does
    assert_computes_plain(model, x)
    model[0].weight = torch.nn.Parameter(torch.randn(24, 32).to(torch.bfloat16))  # replaced
    assert_computes_plain(model, x)


def test_a_packed_model_can_be_copied_and_saved():
    import copy
    import io

    model, x = packed_bf16_linear()
    with torch.inference_mode():
        expected = model(x)
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        for other in (twin, loaded, model):
            assert isinstance(other[0], PackedLinear)
            torch.testing.assert_close(other(x), expected)


def test_a_packed_weight_that_disagrees_leaves_the_model_plain(monkeypatch, caplog):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    monkeypatch.setattr(packed_linear, "packed_linear", lambda x, packed, bias: torch.zeros(*x.shape[:-1], 32))
    with caplog.at_level("WARNING", logger="htp_embed.packed_linear"):
        assert pack_linear_layers(model) == 0
    assert all(type(layer) is torch.nn.Linear for layer in model)
    assert "disagreed" in caplog.text


class GatedFeedForward(torch.nn.Module):
    """A gated tanh-GELU feed-forward that declares its fused gate-and-up projection, as the
    own Gemma 3 forward pass's does."""

    def __init__(self, width: int = 48, inner: int = 80):
        super().__init__()
        self.inner = inner
        self.gate_up = torch.nn.Linear(width, 2 * inner, bias=False)
        self.down = torch.nn.Linear(inner, width, bias=False)

    def gelu_gated_rows(self) -> dict[str, int]:
        return {"gate_up": self.inner}


def plain_gelu_gate(x: torch.Tensor, weight: torch.Tensor, split: int) -> torch.Tensor:
    gate, up = (x.float() @ weight.float().T).split(split, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


needs_gelu_gate = pytest.mark.skipif(packed_linear.gelu_gate_unavailable_reason() is not None,
                                     reason="this PyTorch cannot fuse the GELU into packed projections")


@needs_gelu_gate
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_declared_gelu_gate_is_fused_and_computes_the_plain_result(dtype):
    torch.manual_seed(0)
    block = GatedFeedForward().to(dtype)
    weight = block.gate_up.weight
    assert pack_linear_layers(block) == 2
    fused = block.gate_up
    assert isinstance(fused, PackedGeluGateLinear) and type(block.down) is PackedLinear
    x = torch.randn(2, 9, 48).to(dtype)
    expected = plain_gelu_gate(x, weight, 80)
    tolerance = (1e-5 if dtype == torch.float32 else 2e-2) * float(expected.detach().abs().max())
    with torch.inference_mode():
        assert torch.allclose(fused.gelu_gate(x).float(), expected, atol=tolerance)
        # its plain forward still gives both halves, and its parameters are the Linear's
        both = F.linear(x, weight).float()
        assert torch.allclose(fused(x).float(), both, atol=2e-2 * float(both.abs().max()))
    assert fused.weight is weight and list(block.state_dict()) == ["gate_up.weight", "down.weight"]
    # outside what was packed (autograd), the same result from the plain weight
    x.requires_grad_(True)
    assert torch.allclose(fused.gelu_gate(x).float(), expected, atol=tolerance)


@needs_gelu_gate
def test_a_fused_gelu_gate_follows_its_weight_and_survives_a_copy():
    import copy

    torch.manual_seed(0)
    block = GatedFeedForward().to(torch.bfloat16)
    pack_linear_layers(block)
    x = torch.randn(3, 48).to(torch.bfloat16)
    with torch.no_grad():
        block.gate_up.weight.mul_(-1.0)  # changed in place after packing
    expected = plain_gelu_gate(x, block.gate_up.weight, 80)
    twin = copy.deepcopy(block)
    with torch.inference_mode():
        for other in (block, twin):
            got = other.gate_up.gelu_gate(x).float()
            assert torch.allclose(got, expected, atol=2e-2 * float(expected.abs().max()))


def test_without_the_fused_op_a_gelu_gate_is_packed_plainly(monkeypatch, caplog):
    monkeypatch.setattr(packed_linear, "gelu_gate_unavailable_reason", lambda: "no binary post-op here")
    block = GatedFeedForward().to(torch.bfloat16)
    with caplog.at_level("INFO", logger="htp_embed.packed_linear"):
        assert pack_linear_layers(block) == 2
    assert type(block.gate_up) is PackedLinear
    assert "no binary post-op here" in caplog.text


@needs_gelu_gate
def test_a_fused_gelu_gate_that_disagrees_is_not_used(monkeypatch, caplog):
    monkeypatch.setattr(packed_linear, "packed_gelu_gate", lambda x, gate, up: torch.zeros(*x.shape[:-1], 80))
    block = GatedFeedForward()
    with caplog.at_level("INFO", logger="htp_embed.packed_linear"):
        assert pack_linear_layers(block) == 2
    assert type(block.gate_up) is PackedLinear and "disagreed" in caplog.text


def test_the_encoder_packs_its_own_model_where_measured_faster_and_keeps_its_vectors(
        tiny_model_dir, cache, monkeypatch):
    measured(monkeypatch, {"24": 1.5, "256": 1.02})
    monkeypatch.setattr(packed_linear, "MIN_PROBED_HIDDEN", 1)  # let the tiny model be measured
    monkeypatch.setattr(encoder_module, "_LOADED", weakref.WeakValueDictionary())  # a load of our own
    encoder = HTPEncoder(model=str(tiny_model_dir), dtype="bfloat16", segmenter="sentencizer", show_progress=False)
    assert encoder.packing is not None and encoder.packing.pack
    layers = decoder_layers(encoder.model)
    packed_count = sum(isinstance(m, PackedLinear) for m in layers.modules())
    assert packed_count == 7 * len(layers)  # q, k, v, o, gate, up, down
    identity = encoder.identity()
    packed_docs, packed_queries = encoder.encode_documents(TEXTS), encoder.encode_queries(TEXTS)
    assert unpack_linear_layers(layers) == packed_count
    plain_docs, plain_queries = encoder.encode_documents(TEXTS), encoder.encode_queries(TEXTS)
    assert np.min(np.sum(packed_docs * plain_docs, axis=1)) > 0.999
    assert np.min(np.sum(packed_queries * plain_queries, axis=1)) > 0.999
    assert encoder.identity() == identity


def test_a_callers_decoder_is_never_packed():
    from tiny_decoder import tiny_encoder

    encoder = tiny_encoder()
    assert encoder.packing is None
    assert not any(isinstance(m, PackedLinear) for m in encoder.model.modules())


def test_the_real_probe_is_short_and_reports_every_length():
    speedups = packed_linear.probe_packed_speedup((256, 512), torch.bfloat16, lengths=(8, 64), repeats=3)
    assert set(speedups) == {"8", "64"} and all(value > 0 for value in speedups.values())


@pytest.mark.parametrize("can_pack", [True, False])
def test_the_dtype_probe_compares_the_precisions_as_they_will_run(cache, monkeypatch, can_pack):
    from htp_embed.models import resolve_dtype_decision

    monkeypatch.setattr(precision, "_logged", set())
    if not can_pack:
        monkeypatch.setattr(packed_linear, "unavailable_reason", lambda: "no oneDNN here")
    asked: list[dict] = []

    def probe(shape=precision.DEFAULT_SHAPE, *args, **kwargs):
        asked.append(kwargs)
        return {"24": 2.0, "256": 2.0}

    monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
    resolve_dtype_decision("auto", torch.device("cpu"), model="gemma3-270m")
    assert asked == [{"packed": can_pack, "attention": None}]
    (key,) = json.loads((cache / precision.DECISIONS_FILE).read_text())
    assert key.endswith("packed projections") == can_pack


@pytest.mark.parametrize("setting, kernels", [("auto", ("fused", "matmul")), ("fused", ("fused", "fused")),
                                              ("matmul", ("matmul", "matmul"))])
def test_the_dtype_probe_attends_as_the_own_forward_pass_will(cache, monkeypatch, setting, kernels):
    # Gemma 3's heads, and under "auto" each precision's measured kernel (here: the matrix
    # products only for bfloat16, as on Zen 4), which the loaded decoder then uses too.
    from htp_embed import attention
    from htp_embed.models import resolve_dtype_decision

    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.setattr(attention, "probe_matmul_speedup",
                        lambda layout, dtype: {"256": 1.6 if dtype == torch.bfloat16 else 0.8})
    asked: list[dict] = []

    def probe(shape=precision.DEFAULT_SHAPE, *args, **kwargs):
        asked.append(kwargs)
        return {"24": 2.0, "256": 2.0}

    monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
    resolve_dtype_decision("auto", torch.device("cpu"), model="gemma3-270m", attention_kernel=setting)
    assert [kwargs["attention"] for kwargs in asked] == [((4, 1, 256), kernels)]
    (key,) = json.loads((cache / precision.DECISIONS_FILE).read_text())
    assert key.endswith(f"attention 4/1x256 {kernels[0]}/{kernels[1]}")


def test_the_dtype_probe_runs_grouped_heads_with_either_kernel():
    # 200 positions x 2 heads: enough score elements for the matrix products to run
    speedups = precision.probe_bf16_speedup((128, 256), lengths=(8, 200), repeats=1,
                                            attention=((2, 1, 64), ("fused", "matmul")))
    assert set(speedups) == {"8", "200"} and all(value > 0 for value in speedups.values())


def test_the_packed_dtype_probe_runs():
    speedups = precision.probe_bf16_speedup((256, 512), lengths=(8,), repeats=2, packed=True)
    assert set(speedups) == {"8"} and speedups["8"] > 0


def test_a_cpu_that_cannot_pack_bfloat16_gets_the_plain_dtype_probe(cache, monkeypatch):
    from htp_embed.models import resolve_dtype_decision

    monkeypatch.setattr(precision, "_logged", set())
    asked: list[bool] = []

    def probe(shape=precision.DEFAULT_SHAPE, *args, packed=False, **kwargs):
        asked.append(packed)
        if packed:  # what oneDNN says on an AVX2-only CPU
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")
        return {"24": 0.7, "256": 0.8}

    monkeypatch.setattr(precision, "probe_bf16_speedup", probe)
    decision = resolve_dtype_decision("auto", torch.device("cpu"), model="gemma3-270m")
    assert asked == [True, False] and decision.dtype == "float32"


def test_info_shows_the_packing_decision_beside_the_dtype(cache, monkeypatch):
    from htp_cli.main import _dtype_auto
    from htp_embed.models import resolve_dtype_decision

    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.setattr(precision, "probe_bf16_speedup", lambda *args, **kwargs: {"24": 2.0, "256": 2.0})
    measured(monkeypatch, {"24": 1.3, "256": 1.02})
    resolve_dtype_decision("auto", torch.device("cpu"), model="gemma3-270m")
    cpu_packing_decision(SHAPE, torch.bfloat16, cache)
    shown = _dtype_auto(640)
    assert shown["decisions"][0]["dtype"] == "bfloat16"
    (packing,) = shown["linear_packing"]
    assert packing["pack"] is True and packing["key"].endswith("bfloat16") and "1.30x" in packing["reason"]
    assert _dtype_auto(576).get("linear_packing") in (None, [])  # another model width


def test_packing_can_be_turned_off_and_is_a_runtime_setting(tiny_model_dir, cache, monkeypatch):
    from pipelines.settings import Settings

    measured(monkeypatch, {"24": 1.5, "256": 1.02})
    monkeypatch.setattr(packed_linear, "MIN_PROBED_HIDDEN", 1)
    monkeypatch.setattr(encoder_module, "_LOADED", weakref.WeakValueDictionary())
    settings = {"model": str(tiny_model_dir), "dtype": "bfloat16", "segmenter": "sentencizer", "show_progress": False}
    plain = HTPEncoder(packed_linear="off", **settings)
    packed = HTPEncoder(**settings)
    assert plain.model is not packed.model  # an "off" load is never served a packed model, nor back
    assert not plain.packing.pack and plain.packing.source == "explicit"
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    assert packed.packing.pack and plain.identity() == packed.identity()
    # like dtype: where and how fast to compute, so an index keeps its encoder
    chosen = Settings(encoder={"packed_linear": "off"})
    assert chosen.explicit_encoder_settings() == {} and chosen.runtime_encoder_settings()["packed_linear"] == "off"
