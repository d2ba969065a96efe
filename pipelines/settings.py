"""Settings of the pipelines and commands: one typed object from defaults, a TOML file and
environment variables (in rising priority); command-line options override all three.

    # htp-index.toml
    index_kind = "hnsw"
    chunk_size = 400
    [encoder]
    method = "htp"
    k = "adaptive:8"

    HTP_INDEX_ENCODER__METHOD=vanilla HTP_INDEX_INDEX_KIND=flat htp-index ingest docs/ --index idx
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from htp_embed import EncoderConfig, KPolicy
from pipelines.errors import SettingsFileError, SettingsFileNotFoundError

log = logging.getLogger(__name__)

CONFIG_ENV = "HTP_INDEX_CONFIG"
#: Variables with the settings' prefix that are not settings: read where they are used.
OTHER_ENV = frozenset({CONFIG_ENV, "HTP_INDEX_API_TOKEN", "HTP_INDEX_CACHE"})
_warned_env: set[str] = set()
RUNTIME_ENCODER_FIELDS = ("device", "dtype", "packed_linear", "implementation", "attention_kernel", "batch_size",
                          "cache_dir", "show_progress")
DEFAULT_CONFIG_FILE = "htp-index.toml"
_CHOSEN_CONFIG: ContextVar[Path | None] = ContextVar("htp_index_config", default=None)
# Set while settings are built from data alone (Settings.from_data): no file, no environment.
_DATA_ONLY: ContextVar[bool] = ContextVar("htp_index_settings_data_only", default=False)


class Settings(BaseSettings):
    """Everything an ingest, rebuild, query or service run needs besides its paths."""

    model_config = SettingsConfigDict(
        env_prefix="HTP_INDEX_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    index_kind: str = Field(
        "auto",
        description="auto (exact segments, IVF with a calibrated nprobe once a segment is large), "
        "flat, hnsw, ivf_flat, ivf_pq or a FAISS factory string",
    )
    metric: Literal["ip", "l2"] = "ip"
    use_gpu: Literal["auto"] | bool = Field("auto", description="FAISS on the GPU: 'auto' when one is visible, true or false")
    gpus: str | None = Field(
        None, pattern=r"^(all|\d+(,\d+)*)$",
        description="FAISS GPUs to search on: 'all', '1' or '0,2' (None: the first); ignored without GPUs",
    )
    gpu_shard: bool = Field(False, description="with several GPUs, split the index between them instead of copying it to each")
    chunk_size: int | None = Field(
        None, ge=32, description="tokens per node; None fits the encoder window with HTP placeholders budgeted"
    )
    chunk_overlap: int = Field(32, ge=0, description="tokens shared by consecutive nodes")
    delete_missing: bool = Field(True, description="remove documents that vanished from the source")
    lock_timeout: float = Field(600.0, ge=0, description="seconds to wait for another ingest to finish")
    # A finite bound: inf (or 1e13) passed "> 0" and then failed as an integer byte count
    # mid-ingest (exit 1), where a setting out of range is bad usage (exit 2).
    max_document_mb: float = Field(
        20.0, gt=0, le=1_048_576,
        description="larger files are reported and skipped (at most 1048576, i.e. 1 TiB)",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="glob patterns of what a source folder's ingest leaves out without a report, as "
        ".gitignore writes them: a pattern without '/' matches a file or folder name at any depth "
        "('*.png', 'README'), one with '/' the path from the source root ('drafts/*.md'), a trailing "
        "'/' folders only ('build/'). A document already indexed under one is deleted at the next ingest",
    )
    trust_file_stats: bool = Field(
        True, description="a folder's file whose size, mtime, ctime and inode are those it had when the "
        "last ingest read and indexed it is not read again; false reads every file every run")
    nodes_per_batch: int = Field(256, ge=1, description="nodes per embedding task (the unit of fan-out)")
    keep_versions: int = Field(3, ge=2, description="index versions kept on disk")
    correction: Literal["center", "adapter", "none"] = Field(
        "center",
        description="vector correction fitted when an index version is first filled: 'center' "
        "(documents minus their mean, queries minus the mean of pseudo-queries from the corpus), "
        "'adapter' (centring plus a linear map fitted on pseudo-query -> node pairs of the corpus: "
        "better dense search, same hybrid, ~10% more embedding at ingest) or 'none'",
    )
    query_mode: Literal["dense", "sparse", "hybrid"] = Field(
        "hybrid", description="default search: dense vectors, sparse keywords (BM25), or hybrid (both fused)"
    )
    alpha: float | None = Field(
        None, ge=0.0, le=1.0,
        description="hybrid: weight of the dense side (1 = dense only, 0 = keywords only; None = the tuned default)",
    )
    fusion: Literal["convex", "rrf"] = Field(
        "convex", description="hybrid: convex combination of normalised scores, or reciprocal-rank fusion"
    )
    rerank: bool = Field(
        False,
        description="rerank every query's hits by the decoder's likelihood of the query given each "
        "hit (off by default: +2.6 NDCG@10 on SciFact dev for ~1.1 s a query on 2 CPU cores; "
        "+2.3 for ~0.9 s with rerank_depth 8)",
    )
    rerank_depth: int = Field(
        10, ge=1, le=100,
        description="reranking scores this many retrieved hits (or top_k, when larger) and returns the best top_k",
    )
    rerank_passage_tokens: int = Field(
        64, ge=16, le=2048,
        description="reranking reads at most this many tokens of each hit: of a longer hit, its heading "
        "and the sentences that best match the query",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _DATA_ONLY.get():
            return (init_settings,)
        toml_file = _CHOSEN_CONFIG.get() or config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvironmentSource(settings_cls)]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given top-level or ``encoder_*`` settings replaced (None = keep).

        Which settings were given explicitly (by file, environment or option) is preserved:
        an existing index fills in the rest from its manifest.
        """
        top = {k: v for k, v in overrides.items() if v is not None and not k.startswith("encoder_")}
        enc = {k.removeprefix("encoder_"): v for k, v in overrides.items() if v is not None and k.startswith("encoder_")}
        data = self.model_dump(exclude_unset=True)
        data.update(top)
        if enc or "encoder" in data:
            data["encoder"] = {**self.encoder.model_dump(exclude_unset=True), **enc}
        return Settings.from_data(data)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Settings:
        """Settings from ``data`` alone (what :meth:`to_transport` wrote, or a copy's fields),
        the rest defaults. Validating through the usual sources read ``./htp-index.toml`` and
        the environment again under ``data``: a flow run, or a copy made with
        :meth:`with_overrides`, of settings loaded with ``--config prod.toml`` took the current
        folder's file's ``index_kind`` where prod.toml named none."""
        token = _DATA_ONLY.set(True)
        try:
            return cls(**data)
        finally:
            _DATA_ONLY.reset(token)

    def to_transport(self) -> dict[str, Any]:
        """The settings as JSON for a flow run or a deployment: only what was set explicitly,
        so that the receiving side still tells chosen encoder settings from defaults (an
        index keeps its own encoder unless one is chosen)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def explicit_encoder_settings(self) -> dict[str, Any]:
        """The encoder settings given explicitly that change vectors (not device, batch size…)."""
        return {
            name: getattr(self.encoder, name)
            for name in self.encoder.model_fields_set
            if name not in RUNTIME_ENCODER_FIELDS
        }

    def faiss_placement(self) -> dict[str, Any]:
        """``use_gpu``/``gpus``/``gpu_shard`` as :meth:`FaissVectorStore.open` and ``create`` take them."""
        gpus: Any = self.gpus
        if gpus and gpus != "all":
            gpus = [int(g) for g in gpus.split(",")]
        return {"use_gpu": self.use_gpu, "gpus": gpus, "gpu_shard": self.gpu_shard}

    def runtime_encoder_settings(self) -> dict[str, Any]:
        """Encoder settings that never change vectors: where and how fast to compute them."""
        return self.encoder.model_dump(include=set(RUNTIME_ENCODER_FIELDS))


def config_file() -> Path | None:
    """``$HTP_INDEX_CONFIG``, else ``./htp-index.toml`` when it exists."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise SettingsFileNotFoundError(f"{CONFIG_ENV}={named} does not name a file")
        return path
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else None


class _EnvironmentSource(EnvSettingsSource):
    """The environment, where a setting that is an object (K) may be written as the file
    writes it: ``HTP_INDEX_ENCODER__K=adaptive:4`` was "error parsing value for field
    'encoder'", since pydantic-settings reads such a variable as JSON only. Text that is not
    JSON goes to the setting's own validation, which reads the spelling or names the field."""

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            if isinstance(value, str):
                return value
            raise


def unknown_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str | None]:
    """The ``HTP_INDEX_*`` variables that name no setting, each with the closest one that does
    (None: nothing close). pydantic-settings ignores them, so a misspelling
    (``HTP_INDEX_QUERYMODE``) would silently leave the default in force."""
    known = {f"HTP_INDEX_{name}".upper() for name in Settings.model_fields}
    known |= {f"HTP_INDEX_ENCODER__{name}".upper() for name in EncoderConfig.model_fields}
    # K's parts are settings too (HTP_INDEX_ENCODER__K__MAX_BLOCKS=4 was said to be ignored)
    known |= {f"HTP_INDEX_ENCODER__K__{name}".upper() for name in KPolicy.model_fields}
    known |= OTHER_ENV
    suffixes = {name.removeprefix("HTP_INDEX_"): name for name in known}
    unknown = {}
    for name in environ:
        upper = name.upper()
        if upper.startswith("HTP_INDEX_") and upper not in known:
            close = difflib.get_close_matches(upper.removeprefix("HTP_INDEX_"), sorted(suffixes), n=1, cutoff=0.8)
            unknown[name] = suffixes[close[0]] if close else None
    return unknown


def _warn_unknown_environment() -> None:
    for name, close in unknown_environment().items():
        if name not in _warned_env:
            _warned_env.add(name)
            # pydantic-settings drops an unknown top-level name, but an unknown name inside
            # the encoder's settings is refused with them (it was said to be ignored)
            fate = "the encoder settings are refused with it" if name.upper().startswith(
                "HTP_INDEX_ENCODER__") else "it is ignored"
            log.warning("%s is not a setting: %s%s", name, fate, f" (did you mean {close}?)" if close else "")


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults, the config file (``config`` or the usual lookup), the environment
    (a ``HTP_INDEX_*`` variable that names no setting is logged once: it is ignored), then
    ``overrides``."""
    _warn_unknown_environment()
    if config is None:
        return _read(config_file(), overrides)
    if not Path(config).expanduser().is_file():
        raise SettingsFileNotFoundError(f"--config {config} does not name a file")
    # Only for this call: one --config must not leak into later settings of the process.
    token = _CHOSEN_CONFIG.set(Path(config).expanduser())
    try:
        return _read(Path(config).expanduser(), overrides)
    finally:
        _CHOSEN_CONFIG.reset(token)


def _read(file: Path | None, overrides: dict[str, Any]) -> Settings:
    try:
        return Settings().with_overrides(**overrides)
    except tomllib.TOMLDecodeError as exc:  # "Invalid value (at line 1, column 9)": of which file?
        raise SettingsFileError(f"the settings file {file} is not valid TOML: {exc}") from exc
