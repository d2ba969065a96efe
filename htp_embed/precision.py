"""Which precision ``dtype="auto"`` runs in on a CPU: measured once per machine, then cached.

A list of CPU flags cannot answer this. bfloat16 needs native instructions to pay, but having
them is not enough: on an Intel CPU with AVX512-BF16 and oneDNN capped below AMX, bfloat16 ran
the encoder at 0.74x float32, while an AMD EPYC (Zen 4) with the same AVX512-BF16 and no AMX ran
it 1.8-2.2x faster (issue 21). So on first use on a CPU the encoder times a short probe shaped
like the model's decoder layers (projections of its hidden and MLP sizes, attention, norms,
activation, residual adds) in both precisions, interleaved, at a query-like and a
document-like length, and takes bfloat16 only when it is clearly faster on documents
(``BF16_MIN_SPEEDUP``) and not clearly slower on queries (``BF16_MIN_QUERY_SPEEDUP``): "never
slower than float32" matters more than the last few percent. The two bars differ because on
a CPU with many cores the one-layer query probe understates bfloat16: on a 16-vCPU Xeon with
AMX it measured 0.92x at 24 tokens while whole single queries ran even (24.6 vs 24.4 ms) and
documents 1.34x faster; one bar for both gave those documents up for nothing. The rule is
applied to the cached measurements when they are read, so a change of rule needs no new probe.
Where this PyTorch can pack Linear weights (:mod:`htp_embed.packed_linear`), both precisions are
probed packed, as the encoder will run them: packing gains float32 more than bfloat16 on some
CPUs, and a plain-vs-plain probe would then favour bfloat16 where it no longer pays.

The decision is cached per CPU model, torch version and layer shape in
``<cache dir>/dtype_decisions.json`` (delete the file to measure again) and logged once per
process. ``dtype="float32"`` or ``"bfloat16"`` overrides it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from htp_embed.packaged_models import default_cache_dir

if TYPE_CHECKING:  # torch is imported where a probe runs, so reading a cached decision is cheap
    import torch

log = logging.getLogger(__name__)

#: bfloat16 must run the document-length probe at least this much faster than float32. The
#: margin absorbs probe noise on busy cores and the part of a real forward pass the probe does
#: not model (the full model measured 1.8-2.2x where its matmuls alone gain ~2.7x).
BF16_MIN_SPEEDUP = 1.15
#: ... and the query-length probe at least this fast: not clearly slower. Documents are where
#: the encoder spends its time (ingest, rebuild); a single query is mostly fixed work per
#: operator, which the precision does not change (module docstring: 0.92x probed, even whole).
BF16_MIN_QUERY_SPEEDUP = 0.90
#: Tokens per probed sequence: a query or pseudo-query, and a document chunk.
PROBE_LENGTHS = (24, 256)
#: A probed length up to this many tokens is query-shaped and gets the query bar.
QUERY_PROBE_MAX_TOKENS = 64
#: Timed repetitions per precision and length, after one warm-up each (well under 1 s in all
#: on 2 Zen 4 cores for Gemma3-270M's shapes).
PROBE_REPEATS = 7
DECISIONS_FILE = "dtype_decisions.json"
#: Where :mod:`htp_embed.packed_linear` caches whether packing Linear weights pays.
PACKING_FILE = "linear_packing.json"
#: Where :mod:`htp_embed.attention` caches which attention kernel runs faster.
ATTENTION_FILE = "attention_kernel.json"
#: Layer shape probed when the model's own is unknown: Gemma3-270M, the default model.
DEFAULT_SHAPE = (640, 2048)
#: Below this hidden size per-operator overhead, not arithmetic, sets the speed, and a probe
#: would measure noise: such models (test decoders) stay float32 without measuring, so they
#: behave the same on every machine.
MIN_PROBED_HIDDEN = 256

_logged: set[str] = set()
_guard = threading.RLock()  # re-entered when a measurement logs


@dataclass(frozen=True)
class DtypeDecision:
    """What ``dtype="auto"`` resolved to on this machine, and why."""

    dtype: str  # "float32" or "bfloat16"
    reason: str  # one line, for logs, `htp-index info` and benchmarks
    speedups: dict[str, float] | None = None  # bf16/fp32 probe speed per probed length
    cpu: str = ""
    torch: str = ""
    shape: tuple[int, int] | None = None  # (hidden, intermediate) probed
    measured_at: float | None = None  # time.time() of the probe
    source: str = "measured"  # measured, cached, cuda, explicit, not measured
    bf16_instructions: tuple[str, ...] = ()  # native bf16 instruction sets found, for reports

    def summary(self) -> dict[str, object]:
        """A JSON-ready record (what `htp-index info` prints)."""
        data = asdict(self)
        data["shape"] = list(self.shape) if self.shape else None
        data["bf16_instructions"] = list(self.bf16_instructions)
        return data


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("model name", "Model name")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key(cpu: str, torch_version: str, threads: int) -> str:
    """The machine part of every cached decision's key (:func:`cached_records_here` reads its
    first two fields). Thread count is in it because a probe on 2 threads says little about 32."""
    return f"{cpu} | torch {torch_version} | {threads} threads"


def decision_key(cpu: str, torch_version: str, shape: tuple[int, int], threads: int) -> str:
    """The cache key of a layer-shaped probe: what makes a measurement valid elsewhere."""
    return f"{machine_key(cpu, torch_version, threads)} | layers {shape[0]}x{shape[1]}"


def decisions_path(cache_dir: Path, name: str = DECISIONS_FILE) -> Path:
    """The JSON file of measured decisions ``name`` (dtype by default) under ``cache_dir``."""
    return Path(cache_dir) / name


def read_decisions(cache_dir: Path, name: str = DECISIONS_FILE) -> dict[str, dict]:
    """All cached decisions (an unreadable or corrupt file counts as empty: it is re-measured)."""
    try:
        data = json.loads(decisions_path(cache_dir, name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_decision(cache_dir: Path, key: str, record: dict[str, object], name: str = DECISIONS_FILE) -> None:
    """Add one decision to the cache file atomically; a read-only cache just re-measures."""
    path = decisions_path(cache_dir, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        decisions = read_decisions(cache_dir, name)
        decisions[key] = record
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(decisions, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot cache the decision in %s: %s", path, exc)


#: A model's attention for the dtype probe: ``((heads, key/value heads, head dim), kernel)``,
#: kernel "fused", "matmul" or "auto" (each precision's choice, :mod:`htp_embed.attention`).
ProbeAttention = tuple[tuple[int, int, int], str]


def _probe_layer(hidden: int, intermediate: int, dtype: torch.dtype, generator: torch.Generator,
                 packed: bool = False, attention: ProbeAttention | None = None):
    """A decoder layer's arithmetic at the model's sizes, random weights: RMS norms computed in
    float32 and cast back (as Gemma and Llama do), q/k/v/o projections (``packed``: with their
    weights packed as :mod:`htp_embed.packed_linear` does), causal attention, a gated tanh-GELU
    MLP (its activation fused into the projection where :mod:`htp_embed.packed_linear` fuses it)
    and two residual adds. ``attention``: the model's heads and the kernel
    (:func:`htp_embed.attention.attend`'s) this dtype runs; by default heads of 64 and PyTorch's
    fused kernel. Returns ``run(x)``."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - the usual name

    from htp_embed import packed_linear
    from htp_embed.attention import attend

    if attention is None:
        heads = kv_heads = max(hidden // 64, 1)
        head_dim, kernel = hidden // heads, "fused"
    else:
        (heads, kv_heads, head_dim), kernel = attention

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) / cols**0.5).to(dtype)

    qkv, out = weight((heads + 2 * kv_heads) * head_dim, hidden), weight(hidden, heads * head_dim)
    gate_up, down = weight(2 * intermediate, hidden), weight(hidden, intermediate)
    linear = F.linear

    def gelu_gate(x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, gate_up).chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    if packed:
        qkv, out, down = (packed_linear.pack_weight(w) for w in (qkv, out, down))

        def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return packed_linear.packed_linear(x, w, None)

        if packed_linear.gelu_gate_unavailable_reason() is None:  # fused as the encoder fuses it
            gate, up = (packed_linear.pack_weight(w) for w in (gate_up[:intermediate], gate_up[intermediate:]))

            def gelu_gate(x: torch.Tensor) -> torch.Tensor:
                return packed_linear.packed_gelu_gate(x, gate, up)
        else:
            gate_up = packed_linear.pack_weight(gate_up)

    def norm(x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = linear(norm(x), qkv).view(batch, length, heads + 2 * kv_heads, head_dim).split(
            [heads, kv_heads, kv_heads], dim=2)
        attended = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, head_dim**-0.5,
                          kernel)  # type: ignore[arg-type]
        x = x + linear(attended.transpose(1, 2).reshape(batch, length, heads * head_dim), out)
        return x + linear(gelu_gate(norm(x)), down)

    return run


def probe_bf16_speedup(
    shape: tuple[int, int] = DEFAULT_SHAPE,
    lengths: tuple[int, ...] = PROBE_LENGTHS,
    repeats: int = PROBE_REPEATS,
    packed: bool = False,
    attention: tuple[tuple[int, int, int], tuple[str, str]] | None = None,
) -> dict[str, float]:
    """float32 time / bfloat16 time of one probe layer per sequence length (> 1: bf16 faster).

    Timed by :func:`speedup_per_length`. ``packed``: both with packed projection weights, as the encoder
    runs them where this PyTorch can pack (packing gains float32 more than bfloat16 on some
    CPUs: 1.46x vs 1.03x at 256 tokens on Zen 4, so plain vs plain would overstate bfloat16).
    ``attention``: the model's heads and the attention kernel of float32 and of bfloat16, as
    its decoder will run them (PyTorch's fused kernel ran Gemma 3's bfloat16 attention slower
    than float32 on Zen 4, where two matrix products ran it 1.6x faster: fused in both would
    understate bfloat16 there).
    """
    import torch

    hidden, intermediate = shape
    generator = torch.Generator().manual_seed(0)
    layers = {dt: _probe_layer(hidden, intermediate, dt, generator, packed,
                               None if attention is None else (attention[0], attention[1][i]))
              for i, dt in enumerate((torch.float32, torch.bfloat16))}

    def runs(length: int) -> tuple[Callable[[], object], Callable[[], object]]:
        x32 = torch.randn(1, length, hidden, generator=generator)
        x16 = x32.to(torch.bfloat16)
        return (lambda: layers[torch.float32](x32)), (lambda: layers[torch.bfloat16](x16))

    return speedup_per_length(runs, lengths, repeats)


def speedup_per_length(
    runs: Callable[[int], tuple[Callable[[], object], Callable[[], object]]],
    lengths: tuple[int, ...],
    repeats: int,
) -> dict[str, float]:
    """baseline time / candidate time per sequence length, ``runs(length)`` giving the two
    ready-to-call runs. Both are warmed up once (oneDNN primitives, allocations), then they
    alternate run by run, so a neighbour's load falls on both alike; each ratio is of medians."""
    import torch

    speedups: dict[str, float] = {}
    with torch.inference_mode():
        for length in lengths:
            pair = runs(length)
            for run in pair:
                run()
            times: tuple[list[float], list[float]] = ([], [])
            for _ in range(repeats):
                for run, spent in zip(pair, times, strict=True):
                    began = time.perf_counter()
                    run()
                    spent.append(time.perf_counter() - began)
            speedups[str(length)] = statistics.median(times[0]) / statistics.median(times[1])
    return speedups


def decide(speedups: dict[str, float], threshold: float = BF16_MIN_SPEEDUP,
           query_threshold: float = BF16_MIN_QUERY_SPEEDUP) -> tuple[str, str]:
    """``(dtype, reason)`` from probe speedups: bfloat16 only if it is clearly faster at every
    document-shaped length and not clearly slower at every query-shaped one
    (``QUERY_PROBE_MAX_TOKENS``)."""
    def bar(length: str) -> float:
        return query_threshold if int(length) <= QUERY_PROBE_MAX_TOKENS else threshold

    shown = ", ".join(f"{shown_against(speedup, bar(length))}x at {length} tokens"
                      for length, speedup in speedups.items())
    bars = f"needs >= {threshold:.2f}x on documents, >= {query_threshold:.2f}x on queries"
    passes = all(speedup >= bar(length) for length, speedup in speedups.items())
    if passes:
        return "bfloat16", f"bfloat16 measured {shown} float32's speed ({bars})"
    return "float32", f"bfloat16 measured only {shown} float32's speed ({bars})"


def shown_against(value: float, bar: float) -> str:
    """``value`` to two decimals, or to as many more as keep it on its side of ``bar``: 0.8961
    shown "0.90" failed a bar of 0.90, and the reason then read "measured only 0.90x ... (needs
    >= 0.90x)"."""
    for digits in range(2, 16):
        text = f"{value:.{digits}f}"
        if (float(text) >= bar) == (value >= bar):
            return text
    return repr(value)  # reads back as exactly ``value``


def _decided(stored: dict) -> tuple[str, str]:
    """``(dtype, reason)`` of a cached record under today's rule: re-decided from its probe
    speedups where it has them (the probe's duration kept), else as it was stored."""
    speedups = stored.get("speedups")
    if not (isinstance(speedups, dict) and speedups
            and all(str(length).isdigit() and isinstance(value, int | float) for length, value in speedups.items())):
        return stored["dtype"], stored["reason"]
    dtype, reason = decide({str(length): float(value) for length, value in speedups.items()})
    took = stored["reason"].partition("; probe took ")[2]
    return dtype, f"{reason}; probe took {took}" if took else reason


def cpu_dtype_decision(shape: tuple[int, int] | None = None, cache_dir: Path | None = None,
                       attention: ProbeAttention | None = None) -> DtypeDecision:
    """The measured (or cached) precision for ``dtype="auto"`` on this CPU; logged once.
    ``attention``: the model's heads and attention kernel, where its decoder chooses one."""
    import torch

    from htp_embed.models import cpu_bf16_instructions

    shape = shape or DEFAULT_SHAPE
    instructions = cpu_bf16_instructions()
    cpu, threads = cpu_model(), torch.get_num_threads()
    if shape[0] < MIN_PROBED_HIDDEN:
        return DtypeDecision(
            "float32", f"hidden size {shape[0]} < {MIN_PROBED_HIDDEN}: too small for bfloat16 to pay",
            cpu=cpu, torch=torch.__version__, shape=shape, source="not measured",
            bf16_instructions=instructions,
        )
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    from htp_embed.packed_linear import unavailable_reason

    # Compared as the encoder will run them: with packed projections where they can be packed
    # (a decision cached before packing existed says "plain" nowhere, so it is measured again).
    packed = unavailable_reason() is None
    key = decision_key(cpu, torch.__version__, shape, threads) + (" | packed projections" if packed else "")
    probed = None
    if attention is not None:
        layout = attention[0]
        probed = (layout, _probe_kernels(layout, cache, attention[1]))
        key += f" | attention {layout[0]}/{layout[1]}x{layout[2]} {probed[1][0]}/{probed[1][1]}"
    # Two encoders (threads or processes, e.g. Dask workers) opening at once measure once and
    # agree.
    with _guard, file_lock(decisions_path(cache).with_suffix(".lock")):
        stored = read_decisions(cache).get(key)
        if _well_formed(key, stored):
            dtype, reason = _decided(stored)
            decision = DtypeDecision(
                dtype=dtype, reason=reason, speedups=stored.get("speedups"),
                cpu=cpu, torch=torch.__version__, shape=shape,
                measured_at=stored.get("measured_at"), source="cached", bf16_instructions=instructions,
            )
        else:
            began = time.perf_counter()
            try:
                speedups = probe_bf16_speedup(shape, packed=packed, attention=probed)
            except (RuntimeError, TypeError, ValueError) as exc:
                # oneDNN refuses to pack bfloat16 on CPUs without its bf16 instructions
                # (e.g. AVX2 only): bfloat16 weights would run plain there, so probe them plain.
                log.debug("packed probe failed (%s: %s); probing plain projections", type(exc).__name__, exc)
                speedups = probe_bf16_speedup(shape, attention=probed)
            dtype, reason = decide(speedups)
            decision = DtypeDecision(
                dtype=dtype, reason=f"{reason}; probe took {time.perf_counter() - began:.2f} s",
                speedups=speedups, cpu=cpu, torch=torch.__version__, shape=shape,
                measured_at=time.time(), source="measured", bf16_instructions=instructions,
            )
            write_decision(cache, key, decision.summary())
        if key not in _logged:
            _logged.add(key)
            where = decisions_path(cache)
            log.info("dtype auto on %s (%d threads): %s (%s; %s, delete it to measure again)",
                     cpu, threads, decision.dtype, decision.reason, where)
    return decision


def _probe_kernels(layout: tuple[int, int, int], cache_dir: Path, kernel: str) -> tuple[str, str]:
    """The attention kernel of float32 and of bfloat16 for the dtype probe: the configured one,
    or under "auto" each precision's measured (cached) choice for these heads, which the
    decoder loaded in that precision will then use too."""
    if kernel != "auto":
        return kernel, kernel
    import torch

    from htp_embed.attention import cpu_attention_decision

    fp32, bf16 = (cpu_attention_decision(layout, dtype, cache_dir).kernel for dtype in (torch.float32, torch.bfloat16))
    return fp32, bf16


def measured_once(cache_dir: Path, file_name: str, key: str, valid: Callable[[dict], bool],
                  measure: Callable[[], dict[str, object]]) -> tuple[dict, str]:
    """``(record, source)``: the record cached under ``key`` in ``<cache_dir>/<file_name>`` when
    ``valid(record)`` (source "cached"), else ``measure()``'s, written there (source "measured").

    The one way this package caches a per-CPU measurement (Linear packing, the attention
    kernel): two encoders (threads or processes, e.g. Dask workers) opening at once measure
    once and agree.
    """
    path = decisions_path(cache_dir, file_name)
    with _guard, file_lock(path.with_suffix(".lock")):
        stored = read_decisions(cache_dir, file_name).get(key)
        if isinstance(stored, dict) and valid(stored):
            return stored, "cached"
        record = measure()
        write_decision(cache_dir, key, record, file_name)
        return record, "measured"


def log_once(key: str, message: str, *args: object) -> None:
    """Log ``message`` at INFO the first time this process decides ``key``."""
    with _guard:
        if key in _logged:
            return
        _logged.add(key)
    log.info(message, *args)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes where the OS has flock (else none)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def cached_decisions_here(hidden_size: int | None = None, cache_dir: Path | None = None) -> list[dict]:
    """The cached decisions for this CPU model and installed torch (optionally one model width),
    read without importing torch or measuring anything: what `htp-index info` shows."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        return []
    cpu = cpu_model()
    found = []
    for key, record in read_decisions(Path(cache_dir) if cache_dir else default_cache_dir()).items():
        # Chosen by the key, as the encoder chooses (its record's own fields only inform)
        fields = [part.strip() for part in key.split("|")]
        # the distribution's version lacks torch's local tag ("2.13.0" for "2.13.0+cpu")
        if not (_well_formed(key, record) and len(fields) > 1 and fields[0] == cpu
                and fields[1].removeprefix("torch ").split("+")[0] == torch_version.split("+")[0]):
            continue
        if hidden_size is None or record["shape"][0] == hidden_size:
            dtype, reason = _decided(record)
            found.append({"key": key, "dtype": dtype, "reason": reason})
    return found


def _well_formed(key: str, stored: object) -> bool:
    """Whether ``stored`` is a decision record the encoder may use under ``key``: a hand-edited
    or damaged one is measured again by the encoder and left out by `htp-index info` alike (as a
    corrupt file is), never a traceback, never a decision one of them uses and the other hides."""
    if not (isinstance(stored, dict) and stored.get("dtype") in ("float32", "bfloat16")
            and isinstance(stored.get("reason"), str)):
        return False
    shape = stored.get("shape")
    return (isinstance(shape, list) and len(shape) == 2
            and all(type(size) is int and size > 0 for size in shape)
            and f"layers {shape[0]}x{shape[1]}" in (part.strip() for part in key.split("|")))


def cached_packing_here(cache_dir: Path | None = None) -> list[dict]:
    """The cached Linear-packing decisions (:mod:`htp_embed.packed_linear`) for this CPU model
    and installed torch, read without importing torch: what `htp-index info` shows."""
    return cached_records_here(PACKING_FILE, "pack", cache_dir)


def cached_records_here(file_name: str, field: str, cache_dir: Path | None = None) -> list[dict]:
    """``{"key", field, "reason"}`` of each record cached in ``file_name`` by
    :func:`measured_once` for this CPU model and installed torch (the key's first two fields),
    read without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch").split("+")[0]
    except PackageNotFoundError:
        return []
    cpu = cpu_model()
    found = []
    for key, record in read_decisions(Path(cache_dir) if cache_dir else default_cache_dir(), file_name).items():
        fields = [part.strip() for part in key.split("|")]
        if (isinstance(record, dict) and field in record and len(fields) > 1
                and fields[0] == cpu and fields[1].removeprefix("torch ").split("+")[0] == torch_version):
            found.append({"key": key, field: record[field], "reason": record.get("reason")})
    return found
