"""A model's fingerprint: which weights made a vector, independent of device and dtype.

An index refuses vectors and queries from any encoder whose identity differs from the one that
built it, and the identity names the model by its fingerprint. A fingerprint of the
architecture alone let a model fine-tuned and saved to the same directory pass as the old one,
so the fingerprint covers the weights too::

    arch:<16 hex: architecture fields of the config>/weights:<32 hex: the parameter tensors>

**Why the weights are hashed as bfloat16.** The same checkpoint runs in float32 on a CPU and
in bfloat16 on a GPU (or on a CPU with AMX), and an index built one way must accept queries
embedded the other way. Hashing the checkpoint's bytes would not do that: the packaged models
are loaded from a float32 *or* a bfloat16 copy, whose bytes differ. Hashing float32 values
would not either: a bfloat16 load holds rounded values. Rounding every parameter to bfloat16
on the CPU (round-to-nearest-even, idempotent) gives the same bytes from a float32 load and
from a bfloat16 load of the same weights. Two checkpoints that differ only below bfloat16's
precision therefore share a fingerprint, which is the tolerance the product already accepts
between a bf16 and a float32 run. (A float16 load rounds twice and may, rarely, differ; float16
is never chosen automatically.) Names and shapes are hashed with the values, in name order.

**Why a cache.** Hashing reads every weight (a gigabyte for Gemma3-270M, ~1 s), where a load
otherwise reads only the rows a forward pass touches. The digest is computed once per
checkpoint and kept in ``fingerprints.json`` under the cache directory (``$HTP_INDEX_CACHE``),
keyed by the checkpoint directory and the path, size, mtime and inode of its weight files, so
re-saving the directory invalidates it. Only models htp-index loaded itself use the cache; a
decoder passed in by the caller (built in code, or changed in memory after it was read) is
hashed directly; any model is hashed at most once per process.

Indexes written before this recorded the architecture part alone (16 hex digits);
:func:`upgradable` tells when such a record is accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from htp_embed.packaged_models import umask_modes

log = logging.getLogger(__name__)

# The config fields the first fingerprint hashed; kept verbatim, so that an architecture-only
# fingerprint recorded by an older index can still be recognised.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
                       "num_attention_heads", "num_key_value_heads", "vocab_size", "rope_theta")
# The hashing scheme: part of the cache key, so a changed scheme never reuses old digests.
SCHEME = "bf16-sha256-v1"
CACHE_FILE = "fingerprints.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".h5", ".msgpack")
# Elements rounded and hashed at a time: bounds the extra memory to ~32 MB per step.
CHUNK_ELEMENTS = 1 << 24
_MEMO_ATTRIBUTE = "_htp_model_fingerprint"
_CHECKPOINT_ATTRIBUTE = "_htp_checkpoint_key"
FINGERPRINT_KEY = "model_fingerprint"


def architecture_fingerprint(config: Any) -> str:
    """The first fingerprint's 16 hex digits: eight architecture fields of the config."""
    described = json.dumps({key: getattr(config, key, None) for key in ARCHITECTURE_FIELDS},
                           sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """32 hex digits over every parameter's name, shape and bfloat16-rounded values."""
    digest = hashlib.sha256(SCHEME.encode())
    # A model that stores its weights in another layout than its checkpoint (fused projections,
    # htp_embed.gemma3_native) names them as the checkpoint does, so the digest is the same.
    canonical = getattr(model, "canonical_parameters", model.named_parameters)
    for name, parameter in sorted(canonical(), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(parameter.shape)};".encode())
        flat = parameter.detach().reshape(-1)
        for start in range(0, flat.numel(), CHUNK_ELEMENTS):
            digest.update(_canonical_bytes(flat[start : start + CHUNK_ELEMENTS]))
    return digest.hexdigest()[:32]


def _canonical_bytes(values: torch.Tensor) -> bytes:
    """The values as bfloat16 bits, rounded on the CPU (one rounding routine for every device)."""
    values = values.to("cpu")
    if values.is_floating_point():
        values = values.to(torch.bfloat16).view(torch.int16)
    return values.contiguous().numpy().tobytes()


def model_fingerprint(model: torch.nn.Module, cache_dir: Path | None = None) -> str:
    """``arch:<16 hex>/weights:<32 hex>`` of a loaded model; cached per model and per checkpoint."""
    memo = getattr(model, _MEMO_ATTRIBUTE, None)
    if memo is not None:
        return str(memo)
    weights = _cached_weights_digest(model, cache_dir)
    fingerprint = f"arch:{architecture_fingerprint(model.config)}/weights:{weights}"
    setattr(model, _MEMO_ATTRIBUTE, fingerprint)
    return fingerprint


def architecture_part(fingerprint: str) -> str:
    """The architecture digits of a fingerprint, old style (all of it) or new."""
    if fingerprint.startswith("arch:"):
        return fingerprint.removeprefix("arch:").split("/", 1)[0]
    return fingerprint


def is_architecture_only(fingerprint: str) -> bool:
    """Whether a recorded fingerprint is the old one, which named no weights."""
    return not fingerprint.startswith("arch:")


def upgradable(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether an identity ``recorded`` with an architecture-only fingerprint is ``current``'s.

    Such a record (an index written before fingerprints covered the weights) cannot tell
    weights apart, so it is accepted when everything else matches and the architecture does;
    the index should then record ``current``'s fingerprint at its next write.
    """
    old, new = recorded.get(FINGERPRINT_KEY), current.get(FINGERPRINT_KEY)
    if not isinstance(old, str) or not isinstance(new, str) or not is_architecture_only(old):
        return False
    if is_architecture_only(new) or architecture_part(new) != old:
        return False
    return _canonical({**recorded, FINGERPRINT_KEY: new}) == _canonical(current)


def relocated(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether ``current`` is ``recorded``'s encoder with its local model folder at another path
    (moved, or spelled "./m" where "/abs/m" was recorded): the weights fingerprint is the same,
    and so is every other setting.

    The path is only where the weights were found; the fingerprint says which weights they are.
    Packaged models and architecture-only fingerprints (which cannot tell weights apart) are
    never relocated.
    """
    from htp_embed.packaged_models import PACKAGED_MODELS

    old, new = recorded.get("model"), current.get("model")
    fingerprint = recorded.get(FINGERPRINT_KEY)
    if old == new or not isinstance(old, str) or not isinstance(new, str):
        return False
    if old in PACKAGED_MODELS or new in PACKAGED_MODELS:
        return False
    if not isinstance(fingerprint, str) or is_architecture_only(fingerprint):
        return False
    return _canonical({**recorded, "model": new}) == _canonical(current)


def accepts(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether vectors of encoder ``current`` may join (or query) an index recording ``recorded``:
    the same identity, an old record that :func:`upgradable` accepts, or the same weights in a
    local folder at another path (:func:`relocated`)."""
    return (
        _canonical(recorded) == _canonical(current)
        or upgradable(recorded, current)
        or relocated(recorded, current)
    )


def _canonical(identity: Mapping[str, Any]) -> str:
    # The comparison indexes.same_encoder makes (key order never matters), without importing it.
    return json.dumps(dict(identity), sort_keys=True, separators=(",", ":"), default=str)


# ------------------------------------------------------------------ the per-checkpoint cache


def _cached_weights_digest(model: torch.nn.Module, cache_dir: Path | None) -> str:
    """The weights digest from the cache when the checkpoint files are unchanged, else hashed.

    The files are those stated when the model was loaded (`remember_checkpoint`), so weights
    saved over the directory later are never taken for the ones this model holds."""
    recorded = getattr(model, _CHECKPOINT_ATTRIBUTE, None)
    if recorded is None:
        # Not loaded by htp-index (a caller's decoder, maybe changed in memory since it was
        # read): its own weights are hashed, and never cached under a directory's files.
        return weights_digest(model)
    key, files = recorded if recorded[0] is not None else checkpoint_key(_source_of(model))
    if key is None:
        return weights_digest(model)
    cache_path = _cache_dir(cache_dir) / CACHE_FILE
    entry = _read_cache(cache_path).get(key)
    if isinstance(entry, dict) and entry.get("files") == files and isinstance(entry.get("weights"), str):
        return str(entry["weights"])
    log.info("fingerprinting the weights of %s (once per checkpoint)", key.split("|", 1)[1])
    weights = weights_digest(model)
    _write_cache_entry(cache_path, key, {"files": files, "weights": weights})
    return weights


def remember_checkpoint(model: torch.nn.Module, key: tuple[str | None, list[list[Any]]]) -> None:
    """Record on a model htp-index loaded the `checkpoint_key` its files had then. A model not
    named by a directory (a packaged name) records no key and is keyed by the directory it was
    read from (``name_or_path``), so its digest still comes from the cache. Only models marked
    here use the cache at all."""
    setattr(model, _CHECKPOINT_ATTRIBUTE, key)


def checkpoint_key(source: str) -> tuple[str | None, list[list[Any]]]:
    """The cache key of a checkpoint directory and its weight files' stats (name, size, mtime,
    inode): weights saved again under the same path change it. No key for a model built in
    code, a packaged model's name, or a directory without weights."""
    folder = Path(source).expanduser() if source else None
    if folder is None or not folder.is_dir():
        return None, []
    folder = folder.resolve()
    files = file_stats(path for path in sorted(folder.iterdir()) if path.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None, []
    return f"{SCHEME}|{folder}", files


#: The files besides the weights that define a local model: a config or tokenizer saved again
#: over the directory must be loaded again, not served from the copy in memory.
DEFINITION_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.model")


def definition_stats(source: str) -> list[list[Any]]:
    """`file_stats` of a local model directory's `DEFINITION_FILES` ([] for anything else)."""
    folder = Path(source).expanduser() if source else None
    if folder is None or not folder.is_dir():
        return []
    return file_stats(folder / name for name in DEFINITION_FILES)


def file_stats(paths: Iterable[Path]) -> list[list[Any]]:
    """[name, size, mtime, inode] of each of ``paths`` that is a file: a file saved again
    under the same name changes them."""
    stats = []
    for path in paths:
        if path.is_file():
            stat = path.stat()
            stats.append([path.name, stat.st_size, stat.st_mtime_ns, stat.st_ino])
    return stats


def _source_of(model: torch.nn.Module) -> str:
    return str(getattr(model, "name_or_path", "") or "")


def _cache_dir(cache_dir: Path | None) -> Path:
    from htp_embed.models import default_cache_dir

    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or damaged cache is treated as empty (it is rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry, replacing the file atomically; a read-only cache only costs a rehash later."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_cache(path), key: entry}
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        # mkstemp's 0600 made other users of a shared cache hash the weights (and warn) at every load
        os.fchmod(handle, umask_modes()[0])
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        log.warning("could not write the fingerprint cache %s (%s); the weights will be hashed "
                    "again at the next load", path, exc)
