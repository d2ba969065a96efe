"""The matrix-product attention kernel (htp_embed.attention) against PyTorch's fused kernel,
and how the encoder chooses between them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from htp_embed import attention, precision
from htp_embed.attention import attend, cpu_attention_decision, decide, matmul_attention


def inputs(batch: int, heads: int, kv_heads: int, width: int, cached: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, width, 16, generator=generator).to(dtype)
    k, v = (torch.randn(batch, kv_heads, cached + width, 16, generator=generator).to(dtype) for _ in range(2))
    real = torch.ones(batch, cached + width, dtype=torch.bool)
    real[0, cached : cached + 2] = False  # padding between a prefix and the text, as the encoder lays it out
    query_index = torch.arange(cached, cached + width).unsqueeze(1)
    key_index = torch.arange(cached + width).unsqueeze(0)
    mask = ((key_index <= query_index) & real[:, None, None, :]) | (key_index == query_index)
    return q, k, v, mask


def fused(q, k, v, mask, scale=0.25):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize(("heads", "kv_heads", "cached"), [(4, 1, 0), (4, 2, 5), (3, 3, 3)])
def test_matrix_products_give_the_fused_kernels_attention(heads, kv_heads, cached):
    q, k, v, mask = inputs(3, heads, kv_heads, 9, cached)
    torch.testing.assert_close(matmul_attention(q, k, v, mask, 0.25), fused(q, k, v, mask), rtol=1e-5, atol=1e-5)
    if not cached:
        torch.testing.assert_close(matmul_attention(q, k, v, None, 0.25), fused(q, k, v, None), rtol=1e-5, atol=1e-5)
    q, k, v, mask = inputs(3, heads, kv_heads, 9, cached, torch.bfloat16)
    torch.testing.assert_close(matmul_attention(q, k, v, mask, 0.25).float(), fused(q, k, v, mask).float(),
                               rtol=3e-2, atol=3e-2)


def test_a_batch_runs_in_slices_that_agree_with_one_product(monkeypatch):
    q, k, v, mask = inputs(5, 4, 1, 8)
    monkeypatch.setattr(attention, "MIN_SCORES", 0)
    whole = attend(q, k, v, mask, 0.25, "matmul")
    calls = []
    real = attention.matmul_attention
    monkeypatch.setattr(attention, "matmul_attention", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(attention, "CHUNK_SCORES", 2 * 4 * 8 * 8)  # two texts' scores per product
    torch.testing.assert_close(attend(q, k, v, mask, 0.25, "matmul"), whole, rtol=0, atol=0)
    assert calls == [2, 2, 1]


def test_short_and_very_long_calls_keep_the_fused_kernel(monkeypatch):
    q, k, v, mask = inputs(2, 4, 1, 8)
    monkeypatch.setattr(attention, "matmul_attention", lambda *a: pytest.fail("matrix products for a short call"))
    assert torch.equal(attend(q, k, v, mask, 0.25, "matmul"), fused(q, k, v, mask))  # below MIN_SCORES
    monkeypatch.setattr(attention, "MIN_SCORES", 0)
    monkeypatch.setattr(attention, "MAX_TEXT_SCORES", 4 * 8 * 8 - 1)
    assert torch.equal(attend(q, k, v, mask, 0.25, "matmul"), fused(q, k, v, mask))  # one text too big
    assert torch.equal(attend(q, k, v, mask, 0.25, "fused"), fused(q, k, v, mask))


def test_a_gpu_always_runs_the_fused_kernel(monkeypatch):
    """Only the CPU's kernels were measured; tensors elsewhere (here the meta device, which
    stands in for CUDA in CI) go to the fused kernel whatever the setting."""
    monkeypatch.setattr(attention, "MIN_SCORES", 0)
    monkeypatch.setattr(attention, "matmul_attention", lambda *a: pytest.fail("matrix products off the CPU"))
    q, k, v, mask = (t.to("meta") for t in inputs(2, 4, 1, 8))
    assert attend(q, k, v, mask, 0.25, "matmul").shape == (2, 4, 8, 16)


def test_the_products_are_chosen_only_when_clearly_faster():
    assert decide({"256": 1.3})[0] == "matmul"
    kernel, reason = decide({"256": 1.05})
    assert kernel == "fused" and "1.05x" in reason


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "_logged", set())
    return tmp_path


def test_the_kernel_is_measured_once_per_cpu_and_cached(cache, monkeypatch, caplog):
    probes = []
    monkeypatch.setattr(attention, "probe_matmul_speedup", lambda layout, dtype: probes.append(dtype) or {"256": 1.4})
    with caplog.at_level("INFO", logger="htp_embed.precision"):
        first = cpu_attention_decision((4, 1, 256), torch.bfloat16, cache)
        again = cpu_attention_decision((4, 1, 256), torch.bfloat16, cache)
    assert (first.kernel, first.source) == ("matmul", "measured")
    assert (again.kernel, again.source) == ("matmul", "cached")
    assert probes == [torch.bfloat16]
    assert sum("attention kernel" in record.message for record in caplog.records) == 1
    # what `htp-index info` shows, read without torch
    (shown,) = precision.cached_records_here(precision.ATTENTION_FILE, "kernel", cache)
    assert shown["kernel"] == "matmul" and shown["key"] == first.key and "1.40x" in shown["reason"]
    cpu_attention_decision((4, 1, 256), torch.float32, cache)  # another dtype is another measurement
    assert probes == [torch.bfloat16, torch.float32]


def test_a_tiny_decoder_is_not_measured(cache, monkeypatch):
    monkeypatch.setattr(attention, "probe_matmul_speedup", lambda *a: pytest.fail("measured a tiny decoder"))
    decision = cpu_attention_decision((4, 2, 16), torch.float32, cache)
    assert (decision.kernel, decision.source) == ("fused", "not measured")


def test_the_probe_times_both_kernels_on_the_models_heads():
    speedups = attention.probe_matmul_speedup((2, 1, 32), torch.float32, lengths=(24,), repeats=1)
    assert list(speedups) == ["24"] and speedups["24"] > 0


def test_the_kernel_is_a_runtime_setting_like_the_dtype(monkeypatch):
    """Chosen in htp-index.toml or the environment, it never counts as an explicit encoder
    choice (which would make an index refuse its own encoder)."""
    from pipelines.settings import Settings, load_settings

    chosen = Settings(encoder={"attention_kernel": "fused"})
    assert chosen.explicit_encoder_settings() == {}
    assert chosen.runtime_encoder_settings()["attention_kernel"] == "fused"
    monkeypatch.setenv("HTP_INDEX_ENCODER__ATTENTION_KERNEL", "matmul")
    assert load_settings().encoder.attention_kernel == "matmul"
