"""Whether an index accepts an encoder: the one rule the query and ingest paths share.

An index records its encoder's identity, whose model fingerprint covers the weights
(`htp_embed.fingerprint`). Indexes written before that recorded an architecture-only
fingerprint; they keep opening with any weights of that architecture (they cannot tell weights
apart), say so once, and carry the weights fingerprint from their next write on
(`FaissVectorStore.upgrade_encoder`, called by the ingest engine).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from htp_embed.fingerprint import FINGERPRINT_KEY, accepts, relocated, upgradable
from htp_embed.identity import EncoderIdentity, config_from_identity
from indexes.errors import EncoderMismatchError
from pipelines.settings import Settings

log = logging.getLogger(__name__)

_ANNOUNCED: set[tuple[str, str]] = set()


class NotAnEncoderRecordError(EncoderMismatchError):
    """An index whose vectors no htp-index encoder wrote: no encoder can embed for it."""


def require_encoder_record(index_dir: str | Path, recorded: dict[str, Any]) -> None:
    """Refuse to embed for an index whose encoder record htp-index did not write (the store API
    takes any dict, as ``{"model": "synthetic", "dim": 640}``): ingest failed on "invalid
    EncoderIdentity setting: model_fingerprint: Field required; ...", and a dense query asked
    for the folder of model 'synthetic'. The record is read as an :class:`EncoderIdentity`
    (every version htp-index wrote reads), so one holding a fingerprint and a method but no
    exit layer is refused here too, not with that pydantic dump."""
    from pydantic import ValidationError

    try:
        EncoderIdentity.from_record(recorded)
    except ValidationError as error:
        problems = error.errors()
        missing = [".".join(map(str, p["loc"])) for p in problems if p["type"] == "missing"]
        invalid = [".".join(map(str, p["loc"])) for p in problems if p["type"] != "missing"]
        lacks = " and ".join(part for part in (
            f"no {' or '.join(missing)}" if missing else "",
            f"an invalid {' or '.join(invalid)}" if invalid else "") if part)
        raise NotAnEncoderRecordError(
            f"the index at {index_dir} records an encoder with {lacks} "
            f"({', '.join(f'{key}={value!r}' for key, value in recorded.items())}): its vectors were not written "
            "by an htp-index encoder (the store API takes any record), so htp-index cannot embed documents into "
            "it or queries for it. Keyword queries (--mode sparse) and the store API still work; to embed, "
            "ingest its sources into a new index", path=index_dir, stored=recorded) from None


def index_accepts(index_dir: str | Path, recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the index at ``index_dir``, recording encoder ``recorded``, accepts vectors or
    queries of encoder ``current``; an accepted architecture-only record is logged once."""
    if not accepts(recorded, current):
        return False
    if upgradable(recorded, current):
        _announce_upgrade(index_dir, recorded[FINGERPRINT_KEY], current[FINGERPRINT_KEY])
    return True


def warn_ignored_encoder_settings(path: Path, recorded: dict[str, Any], settings: Settings, done: str,
                                  advice: str) -> None:
    """Say so when the settings (options, ``htp-index.toml``, ``HTP_INDEX_*``) ask for another
    encoder than the index records, where the recorded one is used regardless (``done``: what
    is done with it; ``advice``: how to get the settings' encoder)."""
    explicit = settings.explicit_encoder_settings()
    if not explicit:
        return
    recorded_config = config_from_identity(recorded)
    differing = {name: value for name, value in explicit.items() if getattr(recorded_config, name, value) != value}
    if differing:
        asked = ", ".join(f"{name}={_shown(value)}" for name, value in sorted(differing.items()))
        log.warning("%s was built with encoder %s; %s, not as the settings ask (%s): %s",
                    path, recorded_config.model, done, asked, advice)


def _shown(value: Any) -> str:
    """A setting as a user writes it (K as "3" or "adaptive:8", not its model's repr)."""
    return repr(value) if value is None or isinstance(value, str | int | float | bool) else str(value)


def expected_identity(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The identity to check a store against: ``recorded`` itself when it is an older record
    that ``current`` upgrades, or names the same weights at another folder path (the store
    compares exactly, and the record takes ``current``'s at the next write), else ``current``."""
    return recorded if upgradable(recorded, current) or relocated(recorded, current) else current


def _announce_upgrade(index_dir: str | Path, old: str, new: str) -> None:
    key = (str(Path(index_dir).resolve()), old)
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    log.warning(
        "the index at %s records the architecture-only model fingerprint %s (written before "
        "fingerprints covered the weights), so it cannot tell weights apart; accepting the "
        "loaded weights %s of that architecture. The record is upgraded to the weights "
        "fingerprint at the next ingest or rebuild",
        index_dir, old, new,
    )
