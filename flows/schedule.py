"""Scheduled ingestion: a Prefect deployment with a cron or interval schedule, served from this
process against a real Prefect server (``prefect server start``; set ``PREFECT_API_URL``).

A temporary (ephemeral) server cannot hold schedules, so this refuses to start without
``PREFECT_API_URL`` instead of silently never running.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

from pipelines.errors import OptionConflictError
from pipelines.settings import Settings

log = logging.getLogger(__name__)


class NoPrefectServerError(OptionConflictError):
    """A schedule asked for without a Prefect server to hold it: bad usage, which fails again
    unchanged until ``PREFECT_API_URL`` names one (it was a failed run's exit 1)."""


# How long the schedule waits for the Prefect server to answer before refusing: a server that
# is up answers its health check in milliseconds.
SERVER_CHECK_TIMEOUT_S = 2.0


def require_prefect_server() -> None:
    """Refuse to schedule without a Prefect server that answers at ``PREFECT_API_URL``, before
    the flows and the model are loaded (the refusal came ~13 s in, after them; a URL where no
    server answered failed with "All connection attempts failed", exit 1, ~20 s in). Healthy is
    Prefect's own rule (``PrefectClient.api_healthcheck``): ``/health`` answers with a success
    status, asked with ``PREFECT_API_KEY`` as Prefect's client sends it (a Cloud workspace).
    Any answer used to count, so a URL without ``/api`` (404) or another web server (501)
    logged "serving deployment" and failed seconds later with a client error, exit 1."""
    import httpx

    url = PREFECT_API_URL.value()
    if not url:
        raise NoPrefectServerError(
            "schedules need a Prefect server: run `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    key = PREFECT_API_KEY.value()
    try:
        answer = httpx.get(f"{str(url).rstrip('/')}/health", timeout=SERVER_CHECK_TIMEOUT_S,
                           headers={"Authorization": f"Bearer {key}"} if key else None)
    except httpx.TransportError as exc:  # nothing answered: refused, unreachable, timed out
        raise NoPrefectServerError(
            f"schedules need a Prefect server, and none answers at PREFECT_API_URL={url} ({exc or type(exc).__name__}): "
            "run `prefect server start` there, or set PREFECT_API_URL to the one that runs"
        ) from None
    if not answer.is_success:
        hint = (f"; a Prefect server's API is under /api: PREFECT_API_URL={str(url).rstrip('/')}/api"
                if not str(url).rstrip("/").endswith("/api") else
                "; set PREFECT_API_URL to a running Prefect server's API (and PREFECT_API_KEY for Prefect Cloud)")
        raise NoPrefectServerError(
            f"PREFECT_API_URL={url} is not a Prefect server's API: its health check answered "
            f"{answer.status_code} {answer.reason_phrase}{hint}"
        )


def deployment_name(index_dir: str | Path) -> str:
    """A stable, readable name per index: 'ingest-<dir name>-<short hash of the path>'."""
    path = Path(index_dir).resolve()
    return f"ingest-{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def ingest_deployment_kwargs(
    source: str | Path, index_dir: str | Path, settings: Settings, *, cron: str | None = None,
    interval: float | None = None, name: str | None = None,
) -> dict[str, Any]:
    """Arguments of ``ingest_flow_body.serve`` for one scheduled index.

    ``limit=1``: the serving process runs one flow run at a time, and every writer holds the
    index's file lock (ad-hoc runs and other processes too), so two ingests never write one
    index at once. No deployment concurrency limit on the server (``global_limit``): its slot
    was held forever by a run whose process tree was killed (a reboot, a container stop), and
    after a restart every scheduled run was skipped "at capacity", with INFO lines only.
    """
    return {
        "name": name or deployment_name(index_dir),
        "cron": cron,
        "interval": interval,
        "parameters": {
            "source": str(Path(source).resolve()) if Path(source).exists() else str(source),
            "index_dir": str(Path(index_dir).resolve()),
            "settings": settings.to_transport(),
        },
        "limit": 1,
        "tags": ["htp-index"],
        "description": f"Incremental ingest of {source} into {index_dir}",
    }


def serve_ingest_deployment(
    source: str | Path, index_dir: str | Path, settings: Settings, *, cron: str | None = None,
    interval: float | None = None, name: str | None = None,
) -> None:
    """Register the deployment and run its scheduled flow runs until interrupted."""
    require_prefect_server()
    # imported here: the flows, Prefect's engine and torch take seconds, which the check above need not wait for
    from flows.ingest import ingest_flow_body

    if not Path(source).exists():  # allowed (a share mounted later), but not without a word
        log.warning("the source %s does not exist now: each scheduled run fails until it does", source)
    kwargs = ingest_deployment_kwargs(source, index_dir, settings, cron=cron, interval=interval, name=name)
    log.info("serving deployment %s (%s)", kwargs["name"], f"cron {cron}" if cron else f"every {interval} s")
    ingest_flow_body.serve(**kwargs)
