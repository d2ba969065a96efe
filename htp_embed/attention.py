"""Causal attention on the CPU as two matrix products, where that measures faster than the fused kernel.

Why: PyTorch's fused CPU attention (``scaled_dot_product_attention``'s flash kernel) ran
bfloat16 *slower* than float32 on 2 Zen 4 cores without AMX (2.06 vs 1.85 s of a 32-abstract
profile), which capped the bfloat16 encoder's gain over float32. Written as transformers'
"eager" attention is (scores by one batched matrix product, a float32 softmax, the weighted sum
by a second product), with the query heads that share a key/value head folded into the rows
of one product (Gemma3-270M: 4 query heads, 1 key/value head), bfloat16 abstracts embedded
1.12x faster end to end by CPU time (1.11x wall), at cosine >= 0.99999 to the fused kernel;
in float32 the fused kernel stayed faster (0.94x; ``benchmarks/results/attention_kernel.md``).
So, like the dtype and Linear packing (:mod:`htp_embed.precision`), the kernel is measured on
first use on a CPU: both kernels at the model's head layout and dtype, interleaved, on a batch
of abstract-length texts; the matrix products only when clearly faster. Cached per CPU model,
torch version, threads, head layout and dtype in ``<cache dir>/attention_kernel.json``.

The products hold a score matrix (texts x heads x queries x keys), which the fused kernel never
does, so a batch runs in slices of texts whose scores fit the cache (``CHUNK_SCORES``); short
calls (a query's few positions: ``MIN_SCORES``) and very long texts (``MAX_TEXT_SCORES``) keep
the fused kernel whatever was decided, and so does the GPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from htp_embed.precision import (
    ATTENTION_FILE,
    MIN_PROBED_HIDDEN,
    cpu_model,
    decisions_path,
    log_once,
    machine_key,
    measured_once,
    shown_against,
    speedup_per_length,
)

AttentionKernel = Literal["fused", "matmul"]
#: The matrix products must run the probe at least this much faster than the fused kernel.
MATMUL_MIN_SPEEDUP = 1.1
#: Positions per probed text: an abstract (queries keep the fused kernel: ``MIN_SCORES``).
PROBE_LENGTHS = (256,)
PROBE_REPEATS = 7
#: Texts per probed batch at the document-like length (the encoder's CPU batches of abstracts).
PROBE_DOCUMENT_BATCH = 4
#: Score elements (texts x query heads x positions x keys) below which a call keeps the fused
#: kernel: a query's few positions cost the products more in per-operator overhead than they
#: save (one text of 64 positions ran 0.8-0.9x the fused kernel, of 96 1.2-1.3x, 8 texts of 64
#: 2.2x; 2 Zen 4 cores, bfloat16).
MIN_SCORES = 1 << 15
#: Score elements per matrix product: a batch is split into runs of texts that hold at most this
#: many (one text may hold more), so the scores stay in the cache (8 texts of 480 positions ran
#: 1.1x the fused kernel in one product and 1.7x in runs of one or two texts).
CHUNK_SCORES = 1 << 20
#: One text's score elements above which the fused kernel runs (memory: 16M elements are 64 MiB
#: in float32; a text of 1,024 positions with 4 query heads holds 4M).
MAX_TEXT_SCORES = 1 << 24


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Causal attention by two batched matrix products and a float32 softmax.

    ``q`` [batch, heads, width, dim]; ``k``, ``v`` [batch, kv_heads, keys, dim] with ``heads`` a
    multiple of ``kv_heads`` (grouped-query attention: query head ``h`` reads key/value head
    ``h // (heads // kv_heads)``, as ``enable_gqa`` does); ``mask`` [batch, 1, width, keys] True
    where a query may look, or None for plain causal attention (``keys == width``). Every query
    must be allowed at least one key (the model's masks always allow its own position).
    """
    batch, heads, width, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    group = heads // kv_heads
    rows = q.reshape(batch * kv_heads, group * width, dim)
    # The scale is applied inside the product (beta 0: the empty buffer is only written), before
    # the scores are rounded to the model's dtype.
    scores = torch.empty(batch * kv_heads, group * width, keys, dtype=q.dtype).baddbmm_(
        rows, k.reshape(batch * kv_heads, keys, dim).transpose(1, 2), beta=0.0, alpha=scale,
    ).view(batch, kv_heads, group, width, keys)
    if mask is None:
        allowed = torch.ones(width, keys, dtype=torch.bool).tril_(keys - width)
    else:
        allowed = mask.view(batch, 1, 1, width, keys)
    scores.masked_fill_(~allowed, float("-inf"))
    weights = torch.softmax(scores.view(batch * kv_heads, group * width, keys), dim=-1, dtype=torch.float32)
    out = torch.bmm(weights.to(v.dtype), v.reshape(batch * kv_heads, keys, dim))
    return out.view(batch, heads, width, dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           kernel: AttentionKernel = "fused") -> torch.Tensor:
    """Causal attention (see :func:`matmul_attention` for the shapes) by ``kernel``: the matrix
    products on the CPU for calls of ``MIN_SCORES`` to ``MAX_TEXT_SCORES`` score elements per
    text, in runs of texts of at most ``CHUNK_SCORES``; the fused kernel otherwise."""
    batch, heads, width, _ = q.shape
    per_text = heads * width * k.shape[2]
    if (kernel != "matmul" or q.device.type != "cpu" or batch * per_text < MIN_SCORES
            or per_text > MAX_TEXT_SCORES):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=heads != k.shape[1])
    run = max(1, CHUNK_SCORES // per_text)
    if run >= batch:
        return matmul_attention(q, k, v, mask, scale)
    return torch.cat([
        matmul_attention(q[start : start + run], k[start : start + run], v[start : start + run],
                         None if mask is None else mask[start : start + run], scale)
        for start in range(0, batch, run)
    ])


@dataclass(frozen=True)
class AttentionDecision:
    """Which attention kernel the decoder runs on this CPU, and why."""

    kernel: AttentionKernel
    reason: str
    speedups: dict[str, float] | None = None  # fused time / matrix-product time per probed length
    source: str = "measured"  # measured, cached, not measured, explicit
    key: str = ""

    def summary(self) -> dict[str, object]:
        """A JSON-ready record (cached, and what `htp-index info` prints)."""
        return asdict(self)


def probe_matmul_speedup(
    layout: tuple[int, int, int], dtype: torch.dtype, lengths: tuple[int, ...] = PROBE_LENGTHS,
    repeats: int = PROBE_REPEATS,
) -> dict[str, float]:
    """fused time / matrix-product time (> 1: the products pay) of one layer's causal attention
    at ``layout`` (heads, key/value heads, head dim) per sequence length, ``PROBE_DOCUMENT_BATCH``
    texts each, run as :func:`attend` runs them."""
    heads, kv_heads, head_dim = layout
    generator = torch.Generator().manual_seed(0)
    scale = head_dim**-0.5

    def runs(length: int) -> tuple[object, object]:
        batch = PROBE_DOCUMENT_BATCH
        q = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
        k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=generator).to(dtype) for _ in range(2))
        return (lambda: attend(q, k, v, None, scale, "fused")), (lambda: attend(q, k, v, None, scale, "matmul"))

    return speedup_per_length(runs, lengths, repeats)  # type: ignore[arg-type]


def decide(speedups: dict[str, float]) -> tuple[AttentionKernel, str]:
    """The matrix products when every probed length gains at least ``MATMUL_MIN_SPEEDUP``."""
    shown = ", ".join(f"{shown_against(speedup, MATMUL_MIN_SPEEDUP)}x at {length} tokens"
                      for length, speedup in speedups.items())
    if min(speedups.values()) >= MATMUL_MIN_SPEEDUP:
        return "matmul", f"matrix-product attention measured {shown} the fused kernel's speed"
    return "fused", (f"matrix-product attention measured only {shown} the fused kernel's speed "
                     f"(needs >= {MATMUL_MIN_SPEEDUP:.2f}x)")


def cpu_attention_decision(layout: tuple[int, int, int], dtype: torch.dtype, cache_dir: Path) -> AttentionDecision:
    """The attention kernel for a decoder of ``layout`` (heads, key/value heads, head dim) in
    ``dtype`` on this CPU: measured once, then read from the cache; logged once per process."""
    heads, kv_heads, head_dim = layout
    if heads * head_dim < MIN_PROBED_HIDDEN:
        return AttentionDecision("fused", f"{heads} heads of {head_dim}: too small to measure", source="not measured")
    dtype_name = str(dtype).removeprefix("torch.")
    key = (f"{machine_key(cpu_model(), torch.__version__, torch.get_num_threads())} | "
           f"heads {heads}/{kv_heads}x{head_dim} | {dtype_name}")

    def measure() -> dict[str, object]:
        began = time.perf_counter()
        speedups = probe_matmul_speedup(layout, dtype)
        kernel, why = decide(speedups)
        return AttentionDecision(kernel, f"{why}; probe took {time.perf_counter() - began:.2f} s",
                                 speedups, "measured", key).summary()

    record, source = measured_once(
        cache_dir, ATTENTION_FILE, key,
        lambda stored: stored.get("kernel") in ("fused", "matmul") and isinstance(stored.get("reason"), str), measure)
    decision = AttentionDecision(record["kernel"], record["reason"], record.get("speedups"), source, key)
    log_once(f"attention {key}", "attention kernel on %s: %s (%s; %s, delete it to measure again)",
             key, decision.kernel, decision.reason, decisions_path(cache_dir, ATTENTION_FILE))
    return decision
