"""Gemma 3's text decoder written for the encoder's one job: a forward pass to the exit layer.

Why not transformers' ``Gemma3TextModel``, which is the reference this must match:

* **Cold start.** Importing its modeling module pulls in ``torch.distributed``, dynamo and
  sympy: ~2.4 s of a cold ``htp-index query`` on a 2-core EPYC, more than the query's whole
  model work. This module imports torch and safetensors only.
* **Short texts.** A query is ~13 positions after the cached prefix; transformers runs ~230
  operators per layer for it (mask building, cache bookkeeping, dtype round trips, kwargs
  plumbing), and on the CPU each costs microseconds and may wake an OpenMP thread. Here a
  layer is its arithmetic: the same projections (packed by :mod:`htp_embed.packed_linear`
  where measured faster), norms, rotary embedding and attention.
* **HTP's rewiring and early exit are part of the loop** instead of hooks and an exception,
  and a shared prefix's keys and values are plain tensors (see :mod:`htp_embed.prefix_cache`).

The parameters have transformers' names and shapes, so the model's fingerprint, and therefore
every index's encoder identity, is the same whichever class loaded the weights.
``tests/test_gemma3_native.py`` compares its hidden states with ``Gemma3TextModel``'s on the
same weights, in float32 and bfloat16, batched and padded, with rewiring, prefix and exit.

Only what the packaged Gemma 3 models use is supported (causal attention, default RoPE, no
soft-capping); :func:`supports` says so for a config, and anything else loads through
transformers as before.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from htp_embed.attention import AttentionKernel, attend
from htp_embed.packed_linear import PackedGeluGateLinear

MODEL_TYPE = "gemma3_text"
# Modules are built without storage and their weights assigned from the file. The device is
# passed to each constructor rather than set with ``torch.device("meta")``: under that context
# the random initialisation runs through torch's reference ops, which import dynamo (~1 s).
UNLOADED = torch.device("meta")
WEIGHTS_FILE = "model.safetensors"


class NativeConfig:
    """The fields of a ``config.json`` that the decoder and the encoder read, as attributes.

    Stands in for transformers' config object: attributes that config.json does not hold read
    as missing (``getattr(config, name, None)`` gives None, as it does on transformers' object
    for the fields the fingerprint asks about, e.g. ``rope_theta`` under ``rope_parameters``).
    """

    def __init__(self, fields: dict[str, Any]):
        self.__dict__.update(fields)

    @classmethod
    def from_dir(cls, path: Path) -> NativeConfig:
        return cls(json.loads((Path(path) / "config.json").read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def supports(config: Any) -> bool:
    """Whether this module computes what ``Gemma3TextModel`` would for ``config``."""
    def field(name: str, default: Any = None) -> Any:
        return getattr(config, name, default)

    rope = field("rope_parameters") or {}
    return (
        field("model_type") == MODEL_TYPE
        and not field("use_bidirectional_attention", False)
        and field("attn_logit_softcapping") is None
        and not field("attention_bias", False)
        and field("hidden_activation") == "gelu_pytorch_tanh"
        and isinstance(field("layer_types"), list)
        and all(isinstance(rope.get(kind), dict) and rope[kind].get("rope_type", "default") == "default"
                for kind in set(field("layer_types") or []))
    )


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: normalised in float32, scaled by ``1 + weight``, cast back.

    Written out as transformers writes it, the float32 copy normalised and scaled in place, with
    the scale computed once (kept until the weight is replaced or changed in place).
    ``F.rms_norm`` gives the same values but ran 2.8x slower on an abstract batch (0.48 vs
    0.17 ms for 4 x 256 x 640 in bfloat16, 2 Zen 4 cores): its CPU path allocates every step.
    """

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(width, device=UNLOADED), requires_grad=False)
        self._scale: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (weight, version, 1 + weight)

    def scale(self) -> torch.Tensor:
        weight = self.weight
        cached = self._scale
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            cached = (weight, weight._version, 1.0 + weight.detach().float())
            self._scale = cached
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalise(x, self.scale(), self.eps)


def rms_normalise(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x * rsqrt(mean(x**2) + eps) * scale)`` over the last dimension in float32, cast back
    to ``x``'s dtype: transformers' Gemma RMSNorm, operator for operator (so the same values),
    writing into the float32 copy where there is one rather than allocating at each step."""
    xf = x.float()
    factor = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    normed = xf.mul_(factor) if x.dtype != torch.float32 else xf * factor  # never write into x
    return normed.mul_(scale).to(x.dtype)


class Attention(nn.Module):
    """Self-attention with the query, key and value projections fused into one matrix product
    (``qkv_proj``: 1.47x faster than three for a 13-position query on the CPU; their rows are
    transformers' ``q_proj``, ``k_proj``, ``v_proj`` stacked)."""

    def __init__(self, config: NativeConfig):
        super().__init__()
        hidden, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                             config.num_key_value_heads, config.head_dim)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scaling = config.query_pre_attn_scalar ** -0.5
        self.qkv_proj = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=False, device=UNLOADED)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False, device=UNLOADED)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self._query_key_scale: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def query_key_scale(self) -> torch.Tensor:
        """[heads + kv_heads, head_dim]: each query head's row is ``q_norm``'s scale, each key
        head's ``k_norm``'s, so both norms run as one (kept while the two scales are)."""
        q_scale, k_scale = self.q_norm.scale(), self.k_norm.scale()
        cached = self._query_key_scale
        if cached is None or cached[0] is not q_scale or cached[1] is not k_scale:
            rows = torch.cat([q_scale.expand(self.heads, -1), k_scale.expand(self.kv_heads, -1)])
            cached = (q_scale, k_scale, rows)
            self._query_key_scale = cached
        return cached[2]

    def norm_queries_keys(self, qk: torch.Tensor) -> torch.Tensor:
        """``q_norm`` on the query heads and ``k_norm`` on the key heads of ``qk`` [..., heads +
        kv_heads, head_dim] in one pass: the same arithmetic as the two norms, half the
        operators (a query's pass is ~13 positions, where each operator's fixed cost is most of
        its time)."""
        return rms_normalise(qk, self.query_key_scale(), self.q_norm.eps)

    def split_rows(self) -> dict[str, int]:
        """transformers' projections and their rows in ``qkv_proj``, in order."""
        kv = self.kv_heads * self.head_dim
        return {"q_proj": self.heads * self.head_dim, "k_proj": kv, "v_proj": kv}


class MLP(nn.Module):
    """Gemma's gated tanh-GELU feed-forward, gate and up projections fused (``gate_up_proj``)."""

    def __init__(self, config: NativeConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False, device=UNLOADED)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False, device=UNLOADED)

    def split_rows(self) -> dict[str, int]:
        return {"gate_proj": self.intermediate, "up_proj": self.intermediate}

    def gelu_gated_rows(self) -> dict[str, int]:
        """The projection whose first rows are a tanh-GELU gate, and how many: where the
        weights are packed, :mod:`htp_embed.packed_linear` fuses the activation and product."""
        return {"gate_up_proj": self.intermediate}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gate_up_proj, PackedGeluGateLinear):
            return self.down_proj(self.gate_up_proj.gelu_gate(x))
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


#: The fused projection of each block (its ``split_rows`` name the projections it stacks).
FUSED = {"self_attn": "qkv_proj", "mlp": "gate_up_proj"}


class DecoderLayer(nn.Module):
    def __init__(self, config: NativeConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, h: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None,
                kernel: AttentionKernel = "fused") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's output, and its keys and values (after RoPE; the prefix's included).
        ``mask`` None means causal attention over this pass's positions alone; ``kernel`` is
        :func:`htp_embed.attention.attend`'s."""
        attn = self.self_attn
        batch, width, _ = h.shape
        x = self.input_layernorm(h)
        qk, v = attn.qkv_proj(x).view(batch, width, -1, attn.head_dim).split(
            [attn.heads + attn.kv_heads, attn.kv_heads], dim=2)
        # Queries and keys are normed and rotated together: same values, half the operators.
        qk = attn.norm_queries_keys(qk).transpose(1, 2)
        cos, signed_sin = rotary
        qk = qk * cos + qk.roll(attn.head_dim // 2, dims=-1) * signed_sin
        q, k = qk.split([attn.heads, attn.kv_heads], dim=1)
        v = v.transpose(1, 2)
        if prefix is not None:
            k = torch.cat([prefix[0].expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([prefix[1].expand(batch, -1, -1, -1), v], dim=2)
        out = attend(q, k, v, mask, attn.scaling, kernel)
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, width, attn.heads * attn.head_dim))
        h = h + self.post_attention_layernorm(out)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h, k, v


class ScaledEmbedding(nn.Embedding):
    """Gemma's token embedding, multiplied by sqrt(hidden) rounded to the weights' dtype."""

    def __init__(self, vocab: int, width: int, padding_idx: int | None):
        super().__init__(vocab, width, padding_idx, _weight=torch.empty(vocab, width, device=UNLOADED))
        self.scale = math.sqrt(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


@dataclass
class PrefixStates:
    """A shared prefix's keys and values at every layer up to the exit, batch 1."""

    length: int
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]


class NativeGemma3(nn.Module):
    """Gemma 3's text decoder (no LM head) with HTP's rewiring and early exit in its loop."""

    def __init__(self, config: NativeConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList([DecoderLayer(config, kind) for kind in config.layer_types])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sliding_window: int | None = getattr(config, "sliding_window", None)
        # "matmul" where this CPU measured it faster (set by the encoder at load: htp_embed.attention)
        self.attention_kernel: AttentionKernel = "fused"
        self._inverse_frequencies = {
            kind: 1.0 / (float(config.rope_parameters[kind]["rope_theta"])
                         ** (torch.arange(0, config.head_dim, 2, dtype=torch.float, device="cpu") / config.head_dim))
            for kind in set(config.layer_types)
        }

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def canonical_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The parameters under transformers' names and shapes (each fused projection split
        back into views of its rows), which the fingerprint hashes: the same for this model and
        for ``Gemma3TextModel`` on the same weights."""
        fused = set(FUSED.values())
        for name, parameter in self.named_parameters():
            block_path, _, projection = name.removesuffix(".weight").rpartition(".")
            if projection not in fused:
                yield name, parameter
                continue
            start = 0
            for part, rows in self.get_submodule(block_path).split_rows().items():
                yield f"{block_path}.{part}.weight", parameter[start : start + rows]
                start += rows

    def hidden_states(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        *,
        rewire: range = range(0),
        src: torch.Tensor | None = None,
        dst: torch.Tensor | None = None,
        exit_after: int | None = None,
        prefix: PrefixStates | None = None,
        keep_keys_values: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The hidden states after layer ``exit_after`` (0-based; None: all layers and the final
        norm), and with ``keep_keys_values`` each run layer's keys and values.

        ``attention_mask`` [batch, prefix + width] marks real positions (1) and padding (0);
        before each layer in ``rewire``, ``h[b, dst[b, i]] = h[b, src[b, i]]`` (HTP's summary
        copies, what :func:`htp_embed.rewiring.rewired` does with hooks).
        """
        batch, width, _ = embeds.shape
        dtype, device = embeds.dtype, embeds.device
        cached = prefix.length if prefix is not None else 0
        rotary = {kind: _rotary(frequencies, positions, dtype) for kind, frequencies in self._inverse_frequencies.items()}
        masks = self._masks(attention_mask.bool(), positions, cached)
        rows = (torch.arange(batch, device=device).unsqueeze(1).expand_as(src)
                if src is not None and dst is not None and src.numel() else None)
        last = len(self.layers) - 1 if exit_after is None else exit_after
        h = embeds
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for index in range(last + 1):
            layer = self.layers[index]
            if rows is not None and index in rewire:
                h[rows, dst] = h[rows, src]  # in place, on the layer's input (as the hooks do)
            h, k, v = layer(h, rotary[layer.kind], masks[layer.kind],
                            prefix.keys_values[index] if prefix is not None else None, self.attention_kernel)
            if keep_keys_values:
                kept.append((k, v))
        if exit_after is None:
            h = self.norm(h)
        return h, kept

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **unused: Any,
    ) -> Any:
        """transformers' calling convention for a plain pass (``last_hidden_state`` and, when
        asked, ``hidden_states``), for code written against ``AutoModel``; the encoder calls
        :meth:`hidden_states`."""
        from types import SimpleNamespace

        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, width, _ = embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones((batch, width), dtype=torch.long, device=embeds.device)
        if position_ids is None:
            position_ids = torch.arange(width, device=embeds.device).unsqueeze(0).expand(batch, -1)
        states = [embeds]
        handles = ([layer.register_forward_hook(lambda module, args, output: states.append(output[0]))
                    for layer in self.layers] if output_hidden_states else [])
        try:
            hidden, _ = self.hidden_states(embeds, attention_mask, position_ids)
        finally:
            for handle in handles:
                handle.remove()
        if output_hidden_states:
            states[-1] = hidden  # transformers' last entry is after the final norm
        return SimpleNamespace(last_hidden_state=hidden, hidden_states=tuple(states) if output_hidden_states else None)

    def prefix_states(self, ids: Sequence[int], exit_after: int | None) -> PrefixStates:
        """Keys and values of ``ids`` (batch 1) at every layer a pass to ``exit_after`` runs."""
        device = self.embed_tokens.weight.device
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
        positions = torch.arange(len(ids), device=device).unsqueeze(0)
        _, kept = self.hidden_states(self.embed_tokens(tokens), torch.ones_like(tokens), positions,
                                     exit_after=exit_after, keep_keys_values=True)
        return PrefixStates(len(ids), kept)

    def _masks(self, real: torch.Tensor, positions: torch.Tensor, cached: int) -> dict[str, torch.Tensor | None]:
        """Boolean [batch, 1, width, cached + width] masks per layer kind: causal by index over
        the real keys, and where the layer has a sliding window, within it by *position*: a
        batch behind a cached prefix has its padding between the prefix and the text, so index
        distances would count the padding. Every position may see itself, so a padding row never
        attends to nothing (its output is never read). None (plain causal attention, the faster
        kernel) where that is all a mask would say."""
        batch, width = positions.shape
        total = cached + width
        window = self.sliding_window
        if not cached and bool(real.all()) and (window is None or total <= window):
            return {"full_attention": None, "sliding_attention": None}
        device = real.device
        query_index = torch.arange(cached, total, device=device).unsqueeze(1)
        key_index = torch.arange(total, device=device).unsqueeze(0)
        own = key_index == query_index
        full = ((key_index <= query_index) & real[:, None, None, :]) | own
        masks: dict[str, torch.Tensor | None] = {"full_attention": full}
        if window is not None and total > window:
            key_positions = torch.cat([torch.arange(cached, device=device).expand(batch, -1), positions], dim=1)
            near = (positions[:, None, :, None] - key_positions[:, None, None, :]) < window
            masks["sliding_attention"] = full & (near | own)
        else:
            masks["sliding_attention"] = full
        return masks


def _rotary(inverse_frequencies: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [batch, 1, width, head_dim] for ``positions`` [batch, width], as
    transformers computes them (in float32, then rounded to the hidden states' dtype), the sin's
    first half negated: transformers' ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x)``
    is ``cat(-x2, x1)``, equals ``x * cos + roll(x, half) * signed_sin`` exactly (a sign moved
    from one factor to the other), in two fewer operators."""
    frequencies = positions[..., None].float() * inverse_frequencies.to(positions.device)
    angles = torch.cat((frequencies, frequencies), dim=-1)
    sin = angles.sin()
    sin[..., : frequencies.shape[-1]].neg_()
    return angles.cos().to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


def load_native(path: Path, dtype: torch.dtype, config: NativeConfig | None = None) -> NativeGemma3:
    """The decoder in ``path`` (config.json + model.safetensors, or ``config`` already read
    from it), its weights memory-mapped when they are stored in ``dtype`` (only the embedding
    rows a text uses are ever read)."""
    config = config or NativeConfig.from_dir(path)
    model = build_native(config, read_safetensors(Path(path) / WEIGHTS_FILE), dtype, str(path))
    # Where the weights came from, under transformers' attribute name: the fingerprint's
    # per-checkpoint cache is keyed by it (without it every load would hash the whole file).
    model.name_or_path = str(path)
    return model


def from_transformers(model: nn.Module) -> NativeGemma3:
    """This module's decoder on the weights of a loaded ``Gemma3TextModel`` (shared, not copied,
    except the fused projections)."""
    state = {name: parameter.detach() for name, parameter in model.named_parameters()}
    dtype = next(iter(state.values())).dtype
    return build_native(NativeConfig(model.config.to_dict()), state, dtype, type(model).__name__)


def build_native(config: NativeConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> NativeGemma3:
    """The decoder of ``config`` on ``state``, transformers' Gemma 3 weights by name."""
    if not supports(config):
        raise ValueError(f"{source} is not a Gemma 3 text decoder this module supports")
    model = NativeGemma3(config)
    expected = dict(model.canonical_parameters())  # transformers' names and shapes
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(name for name in set(expected) & set(state) if state[name].shape != expected[name].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: weights do not match Gemma 3's layout (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {wrong[:3]})")
    state = fuse_projections(state, model)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()}, assign=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def fuse_projections(state: dict[str, torch.Tensor], model: NativeGemma3) -> dict[str, torch.Tensor]:
    """transformers' weights with each layer's q/k/v and gate/up projections stacked into the
    fused ones this model runs."""
    state = dict(state)
    for index, layer in enumerate(model.layers):
        for block_name, fused_name in FUSED.items():
            block = getattr(layer, block_name)
            names = [f"layers.{index}.{block_name}.{part}.weight" for part in block.split_rows()]
            state[f"layers.{index}.{block_name}.{fused_name}.weight"] = torch.cat([state.pop(name) for name in names])
    return state


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of its (copy-on-write) memory map.

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
    range of each tensor) and the raw data; ``safetensors.torch.load_file`` would copy every
    tensor, reading the whole gigabyte on each load. The map lives as long as any tensor does.
    """
    import mmap
    import warnings

    damaged = (f"{path} is damaged ({{}}); it is a converted copy htp-index wrote: delete its folder "
               f"and the next load converts the model again")
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        file_size = os.fstat(handle.fileno()).st_size
        try:
            header = json.loads(handle.read(size)) if 8 + size <= file_size else None
        except ValueError:
            header = None
        if not isinstance(header, dict):
            raise ValueError(damaged.format("no readable header"))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if 8 + size + max(ends, default=0) > file_size:
            raise ValueError(damaged.format(f"{file_size:,} bytes where its header describes "
                                            f"{8 + size + max(ends):,}: cut short"))
        # Copy-on-write: a page written to (nothing here does) becomes private, never the file's.
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, not a float this loader reads")
        begin, end = entry["data_offsets"]
        count = (end - begin) // torch.tensor([], dtype=dtype).element_size()
        with warnings.catch_warnings():  # the copy-on-write map is writable; torch cannot tell
            warnings.simplefilter("ignore", UserWarning)
            flat = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin)
                    if count else torch.empty(0, dtype=dtype))
        tensors[name] = flat.view(entry["shape"])
    return tensors
