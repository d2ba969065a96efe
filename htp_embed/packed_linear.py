"""The decoder's Linear layers with their weights packed once for oneDNN, where that measures faster.

Why: on the CPU a Linear call with a plain weight has oneDNN re-order that weight into its
blocked layout on every call. For a document's hundreds of tokens that is a small part of the
call; for a query's ~20 tokens (the instruction prefix comes from the prefix cache) it is a
large one, and a query makes ~90 such calls at exit layer 13. Packing each weight once at load
measured 1.06-1.21x on single queries and 1.00-1.06x on abstracts on 2 Zen 4 cores in bfloat16
(``benchmarks/results/linear_packing.md``).
PyTorch's own compiler packs weights this way for frozen CPU models, through
``torch.ops.mkldnn._reorder_linear_weight`` and ``torch.ops.mkldnn._linear_pointwise``. They are
not public API, so nothing here trusts them blindly:

* the ops missing (another build of PyTorch) -> plain layers, said once in the log;
* whether to pack is measured on first use on a CPU, like the dtype (:mod:`htp_embed.precision`):
  plain vs packed projections of the model's sizes, interleaved, at a query-like and a
  document-like length; packed only when clearly faster for queries and not slower for
  documents. Cached per CPU model, torch version, threads, layer shape and dtype in
  ``<cache dir>/linear_packing.json``;
* each packed weight shape is checked against ``F.linear`` on a probe input at load, and the
  whole model stays plain if one disagrees;
* a packed layer hands any call it was not packed for (another dtype or device, autograd) to
  ``F.linear`` on the original weight, which it keeps: parameter names, the weights' fingerprint
  and ``state_dict`` do not change; a weight replaced or changed in place is packed again
  before its next use, and so is a copied or unpickled layer. An edit through ``.data`` bumps
  no version counter and is not seen (nor by the norms' cached scale, the prefix cache or the
  fingerprint, which is taken once per model): an encoder's weights are not to change under
  it; build a new ``HTPEncoder`` on a changed model instead.

Gated feed-forwards: where a parent module declares that a projection stacks a tanh-GELU gate's
rows over the up rows (``gelu_gated_rows()``; the own Gemma 3 forward pass's MLP does), that
projection is packed as two halves and :meth:`PackedGeluGateLinear.gelu_gate` runs the activation
and the product as oneDNN post-ops of the two calls. The GELU and the product were separate passes
over the widest activations, which bfloat16 did not speed up at all (the same time as float32 in
the profile), so fusing them gains bfloat16 most (``benchmarks/results/gelu_fusion.md``). It is
checked at load like each packed shape, against the plain computation; ops missing or a
disagreement leave the activation a separate step, said once in the log.

The packed copies cost memory once more the decoder layers' projection weights (~200 MB for
Gemma3-270M in bfloat16); the original weights are then only read again by ``state_dict``.
``EncoderConfig.packed_linear = "off"`` (``HTP_INDEX_ENCODER__PACKED_LINEAR=off``) never packs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name

from htp_embed.precision import (
    MIN_PROBED_HIDDEN,
    PACKING_FILE,
    PROBE_LENGTHS,
    cpu_model,
    decision_key,
    decisions_path,
    log_once,
    measured_once,
    shown_against,
    speedup_per_length,
)

log = logging.getLogger(__name__)

#: Packed projections must run the query-like length at least this much faster than plain ones.
PACKED_MIN_SPEEDUP = 1.1
#: ... and every other probed length at least this fast (not slower, less the probe's noise).
PACKED_MIN_OTHER = 0.97
PROBE_REPEATS = 9
#: Largest |packed - plain| allowed on the probe, relative to the largest |plain| output: the two
#: only sum in another order (bfloat16 keeps ~3 significant digits).
AGREEMENT_TOLERANCE = 2e-2


@dataclass(frozen=True)
class PackingDecision:
    """Whether the decoder's Linear weights are packed on this CPU, and why."""

    pack: bool
    reason: str
    speedups: dict[str, float] | None = None  # plain time / packed time per probed length
    source: str = "measured"  # measured, cached, unavailable, not measured, explicit
    key: str = ""

    def summary(self) -> dict[str, object]:
        """A JSON-ready record (cached, and what `htp-index info` prints)."""
        return asdict(self)


def unavailable_reason() -> str | None:
    """Why this PyTorch cannot pack Linear weights for oneDNN, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch was built without oneDNN"
    for name in ("_reorder_linear_weight", "_linear_pointwise"):
        if not hasattr(torch.ops.mkldnn, name):
            return f"torch.ops.mkldnn.{name} is missing in torch {torch.__version__}"
    return None


def gelu_gate_unavailable_reason() -> str | None:
    """Why this PyTorch cannot fuse a gated tanh-GELU into packed projections, or None."""
    reason = unavailable_reason()
    if reason is None and not hasattr(torch.ops.mkldnn._linear_pointwise, "binary"):
        reason = f"torch.ops.mkldnn._linear_pointwise.binary is missing in torch {torch.__version__}"
    return reason


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` re-ordered once into oneDNN's layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` from the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_gelu_gate(x: torch.Tensor, packed_gate: torch.Tensor, packed_up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x @ gate.T) * (x @ up.T)`` in two oneDNN calls: the activation and the product
    are post-ops applied to each call's float32 accumulators, not elementwise passes of their own
    (and the GELU sees the gate before it is rounded to bfloat16)."""
    gate = torch.ops.mkldnn._linear_pointwise(x, packed_gate, None, "gelu", [], "tanh")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, packed_up, None, "mul")


def gelu_gate(x: torch.Tensor, weight: torch.Tensor, split: int) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` from a weight stacking ``split`` gate rows over the up rows: the
    plain computation :func:`packed_gelu_gate` fuses."""
    gate, up = F.linear(x, weight).split(split, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose forward uses its weight packed once; same parameters, same names."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed_dtype = linear.weight.dtype
        self._pack()

    def _pack(self) -> None:
        self.packed = pack_weight(self.weight)
        self._packed_from = (self.weight, _version(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready_for(x):
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)

    def _ready_for(self, x: torch.Tensor) -> bool:
        """Whether ``x`` can go through the packed weight (packed again first if the weight
        changed); False sends the call to ``F.linear`` on the original weight."""
        if (
            x.device.type != "cpu"
            or x.dim() < 2
            or x.dtype != self.packed_dtype
            or self.weight.dtype != self.packed_dtype
            or self.weight.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return False
        source, version = self._packed_from
        if source is not self.weight or version != _version(self.weight):
            # The weight was replaced or changed in place (a fine-tune step in this process):
            # a stale packed copy would answer silently wrong.
            self._pack()
        return True

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind (oneDNN's opaque tensor has no
        storage to copy); it is packed again on first use."""
        state = self.__dict__.copy()
        state["packed"], state["_packed_from"] = None, (None, -1)
        return state

    def plain(self) -> torch.nn.Linear:
        """The ``nn.Linear`` this was made from (the same parameters)."""
        linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                 device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {self.packed_dtype}"


class PackedGeluGateLinear(PackedLinear):
    """The fused gate-and-up projection of a gated tanh-GELU feed-forward (``split`` gate rows
    over the up rows, no bias), packed as two halves so that :meth:`gelu_gate` runs the
    activation and the product as oneDNN post-ops (:func:`packed_gelu_gate`). Same parameters
    and names as the ``nn.Linear``; its plain ``forward`` still returns both halves."""

    def __init__(self, linear: torch.nn.Linear, split: int):
        if linear.bias is not None or not 0 < split < linear.out_features:
            raise ValueError("a gated projection is packed without a bias, split inside its rows")
        self.split = split
        super().__init__(linear)

    def _pack(self) -> None:
        self.packed = (pack_weight(self.weight[: self.split]), pack_weight(self.weight[self.split :]))
        self._packed_from = (self.weight, _version(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready_for(x):
            return F.linear(x, self.weight)
        return torch.cat([packed_linear(x, half, None) for half in self.packed], dim=-1)

    def gelu_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu_tanh(gate) * up`` of ``x`` (:func:`gelu_gate`), fused where packed."""
        if not self._ready_for(x):
            return gelu_gate(x, self.weight, self.split)
        return packed_gelu_gate(x, *self.packed)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate rows {self.split} fused with tanh-GELU"


def _version(tensor: torch.Tensor) -> int:
    """How many times ``tensor`` was changed in place (autograd's counter)."""
    return int(tensor._version)


def pack_linear_layers(modules: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``modules`` with a :class:`PackedLinear`, each weight
    shape checked against ``F.linear`` first; returns how many were packed (0: left plain, with
    the reason logged). Call under the model's load lock: it edits the modules in place."""
    reason = unavailable_reason()
    if reason is not None:
        log.info("Linear weights stay unpacked: %s", reason)
        return 0
    targets = [(parent, name, child) for parent, name, child in _children(modules)
               if type(child) is torch.nn.Linear and child.weight.device.type == "cpu"]
    checked: set[tuple] = set()
    for _, _, linear in targets:
        shape = (tuple(linear.weight.shape), linear.weight.dtype, linear.bias is not None)
        if shape in checked:
            continue
        checked.add(shape)
        try:
            disagreement = _disagreement(linear)
        except (RuntimeError, TypeError, ValueError) as exc:  # an op that refuses this weight
            log.info("Linear weights stay unpacked: packing a %s weight failed (%s: %s)",
                     shape[0], type(exc).__name__, exc)
            return 0
        if disagreement > AGREEMENT_TOLERANCE:
            log.warning("Linear weights stay unpacked: a packed %s weight disagreed with F.linear by %.3g",
                        shape[0], disagreement)
            return 0
    gate_splits = _gelu_gate_splits(targets)
    for parent, name, linear in targets:
        split = gate_splits.get((id(parent), name))
        setattr(parent, name, PackedLinear(linear) if split is None else PackedGeluGateLinear(linear, split))
    return len(targets)


def _gelu_gate_splits(targets: list[tuple[torch.nn.Module, str, torch.nn.Linear]]) -> dict[tuple[int, str], int]:
    """``(id(parent), name) -> gate rows`` for the targets to pack as :class:`PackedGeluGateLinear`:
    those whose parent declares them gated tanh-GELU projections (``gelu_gated_rows()``, name ->
    gate rows), where this PyTorch fuses the activation and each shape's fused result agrees with
    the plain one. Anything else is packed plainly, said once in the log."""
    declared = [(parent, name, linear, parent.gelu_gated_rows()[name]) for parent, name, linear in targets
                if name in getattr(parent, "gelu_gated_rows", dict)()]
    if not declared:
        return {}
    reason = gelu_gate_unavailable_reason()
    checked: dict[tuple, float] = {}
    for _, _, linear, split in declared:
        shape = (tuple(linear.weight.shape), linear.weight.dtype, split)
        if reason is None and shape not in checked:
            try:
                checked[shape] = _gelu_gate_disagreement(linear, split)
            except (RuntimeError, TypeError, ValueError) as exc:  # an op that refuses this weight
                reason = f"fusing it failed ({type(exc).__name__}: {exc})"
            else:
                if checked[shape] > AGREEMENT_TOLERANCE:
                    reason = f"the fused result disagreed with the plain one by {checked[shape]:.3g}"
    if reason is not None:
        log.info("The feed-forward's tanh-GELU stays a separate step: %s", reason)
        return {}
    return {(id(parent), name): split for parent, name, _, split in declared}


def unpack_linear_layers(modules: torch.nn.Module) -> int:
    """Undo :func:`pack_linear_layers` (benchmarks compare both in one process)."""
    targets = [(parent, name, child) for parent, name, child in _children(modules) if isinstance(child, PackedLinear)]
    for parent, name, packed in targets:
        setattr(parent, name, packed.plain())
    return len(targets)


def _children(modules: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """``(parent, attribute name, child)`` for every module under ``modules`` (listed before any
    is replaced)."""
    return [(parent, name, child) for parent in modules.modules() for name, child in parent.named_children()]


def _disagreement(linear: torch.nn.Linear) -> float:
    """max |packed - plain| / max |plain| on a random input of 5 tokens."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, linear.in_features, generator=generator).to(linear.weight.dtype)
    with torch.inference_mode():
        plain = F.linear(x, linear.weight, linear.bias).float()
        packed = packed_linear(x, pack_weight(linear.weight), linear.bias).float()
    scale = float(plain.abs().max()) or 1.0
    return float((packed - plain).abs().max()) / scale


def _gelu_gate_disagreement(linear: torch.nn.Linear, split: int) -> float:
    """max |fused - plain| / max |plain| of the gated tanh-GELU on a random input of 5 tokens."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, linear.in_features, generator=generator).to(linear.weight.dtype)
    with torch.inference_mode():
        plain = gelu_gate(x, linear.weight, split).float()
        halves = (pack_weight(linear.weight[:split]), pack_weight(linear.weight[split:]))
        fused = packed_gelu_gate(x, *halves).float()
    scale = float(plain.abs().max()) or 1.0
    return float((fused - plain).abs().max()) / scale


def probe_packed_speedup(
    shape: tuple[int, int], dtype: torch.dtype, lengths: tuple[int, ...] = PROBE_LENGTHS,
    repeats: int = PROBE_REPEATS,
) -> dict[str, float]:
    """plain time / packed time (> 1: packing pays) of a layer's projections at the model's sizes
    (hidden->hidden, hidden->intermediate, intermediate->hidden) per sequence length, timed by
    :func:`htp_embed.precision.speedup_per_length`."""
    hidden, intermediate = shape
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randn(rows, cols, generator=generator) / cols**0.5).to(dtype)
               for rows, cols in ((hidden, hidden), (intermediate, hidden), (hidden, intermediate))]
    packed = [pack_weight(weight) for weight in weights]

    def runs(length: int) -> tuple[Callable[[], object], Callable[[], object]]:
        inputs = [torch.randn(1, length, weight.shape[1], generator=generator).to(dtype) for weight in weights]
        return (lambda: [F.linear(x, w) for x, w in zip(inputs, weights, strict=True)],
                lambda: [packed_linear(x, w, None) for x, w in zip(inputs, packed, strict=True)])

    return speedup_per_length(runs, lengths, repeats)


def decide(speedups: dict[str, float]) -> tuple[bool, str]:
    """Pack when the shortest (query-like) length gains at least ``PACKED_MIN_SPEEDUP`` and no
    length is slower (``PACKED_MIN_OTHER``)."""
    query = min(speedups, key=int)
    shown = ", ".join(
        f"{shown_against(speedup, PACKED_MIN_SPEEDUP if length == query else PACKED_MIN_OTHER)}x at {length} tokens"
        for length, speedup in speedups.items())
    shortest = speedups[query]
    if shortest >= PACKED_MIN_SPEEDUP and min(speedups.values()) >= PACKED_MIN_OTHER:
        return True, f"packed projections measured {shown} the plain ones' speed"
    return False, (f"packed projections measured only {shown} the plain ones' speed (needs "
                   f">= {PACKED_MIN_SPEEDUP:.2f}x for queries, >= {PACKED_MIN_OTHER:.2f}x at every length)")


def cpu_packing_decision(shape: tuple[int, int], dtype: torch.dtype, cache_dir: Path) -> PackingDecision:
    """Whether to pack a model of layer ``shape`` running in ``dtype`` on this CPU: measured
    once, then read from the cache; logged once per process."""
    reason = unavailable_reason()
    if reason is not None:
        return PackingDecision(False, reason, source="unavailable")
    if shape[0] < MIN_PROBED_HIDDEN:
        return PackingDecision(False, f"hidden size {shape[0]} < {MIN_PROBED_HIDDEN}: too small to measure",
                               source="not measured")
    dtype_name = str(dtype).removeprefix("torch.")
    key = f"{decision_key(cpu_model(), torch.__version__, shape, torch.get_num_threads())} | {dtype_name}"

    def measure() -> dict[str, object]:
        began = time.perf_counter()
        try:
            speedups = probe_packed_speedup(shape, dtype)
        except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a dtype oneDNN cannot pack
            return PackingDecision(False, f"the probe failed in {dtype_name}: {type(exc).__name__}: {exc}",
                                   source="unavailable", key=key).summary()
        pack, why = decide(speedups)
        return PackingDecision(pack, f"{why}; probe took {time.perf_counter() - began:.2f} s",
                               speedups, "measured", key).summary()

    record, source = measured_once(
        cache_dir, PACKING_FILE, key,
        lambda stored: isinstance(stored.get("pack"), bool) and isinstance(stored.get("reason"), str), measure)
    decision = PackingDecision(record["pack"], record["reason"], record.get("speedups"),
                               "cached" if source == "cached" else str(record.get("source", source)), key)
    log_once(f"packing {key}", "Linear weights %s on %s: %s (%s; delete it to measure again)",
             "packed" if decision.pack else "not packed", key, decision.reason,
             decisions_path(cache_dir, PACKING_FILE))
    return decision
