"""The HTTP query service for RAG apps in other processes (FastAPI).

``POST /query`` embeds the query with the index's own encoder and searches the live version;
``GET /health`` reports the version served. A watcher notices when ingest or rebuild switches
in a new version, loads it beside the old one, and swaps a single reference, so requests in
flight finish on the version they started with and none is dropped.

Faults a real machine meets: a new version that fails to load (a file still being copied, a
disk hiccup) is retried with back-off and reported as ``stale`` meanwhile; files of the served
version deleted under the service leave it serving what it holds open (an unlinked file lives
on while open), with ``/health`` answering 503 ``unhealthy`` and naming the file (``stale``, 200,
when a newer version is live: retention removed them, and the next reload loads it); a file
cut short or overwritten in place to another size changes what the mapped segment reads, so
queries are refused with a 503 naming it (never a wrong answer) until a good version is switched
in. The check compares sizes with the manifest's: an overwrite that keeps a file's size is not
seen here, since opening a version reads no checksums (so it opens in time that does not grow
with the index); ``htp-index verify`` reads them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import logging
import math
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters
from pydantic import BaseModel, ConfigDict, Field, field_validator

from htp_embed.rerank import RerankUnavailableError
from indexes import HtpIndexError, SegmentStore, SparseIndexMissingError, persist
from indexes.errors import damage_advice
from indexes.spec import Manifest
from pipelines.encoder_check import EncoderCheck
from pipelines.errors import PortInUseError, ServiceAddressError
from pipelines.query import OpenIndex, QueryMode, SearchRequest, open_index
from pipelines.settings import Settings

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4096
MAX_TOP_K = 100
# Room for the widest filter the store answers (~10,000 or'ed conditions, ~250 KB of JSON)
MAX_BODY_BYTES = 2**20
TOKEN_ENV = "HTP_INDEX_API_TOKEN"
# A version that failed to load is retried after RETRY_BASE_S, then twice as long each time,
# at most RETRY_MAX_S apart: a temporary fault heals by itself, a lasting one costs little.
RETRY_BASE_S = 2.0
RETRY_MAX_S = 60.0
# Queries re-check the served files' sizes at most this often (a stat per file).
DAMAGE_CHECK_S = 0.25


def _check_filter_fields(value: Any, where: str = "filters") -> None:
    """Refuse a field LlamaIndex's filter models would silently drop: a misspelled
    ``operator`` (``"op": "!="``) would otherwise filter by ``==``, the opposite."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_filter_fields(item, f"{where}[{i}]")
        return
    if not isinstance(value, dict):
        return
    group = "filters" in value or "condition" in value
    allowed = set(MetadataFilters.model_fields) if group else set(MetadataFilter.model_fields)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a filter has "
                         f"{', '.join(sorted(MetadataFilter.model_fields))}, a group "
                         f"{', '.join(sorted(MetadataFilters.model_fields))}")
    if group:
        _check_filter_fields(value.get("filters"), f"{where}.filters")


def _booleans_as_numbers(value: Any) -> Any:
    """Filter values ``true``/``false`` as 1/0, as the CLI reads ``-f public=true``: the store
    compares a stored boolean as 0/1, but LlamaIndex's filter model takes no booleans (a 422
    with a long union error)."""
    if isinstance(value, list):
        return [_booleans_as_numbers(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "filters" in value:
        return {**value, "filters": _booleans_as_numbers(value["filters"])}
    given = value.get("value")
    if isinstance(given, bool):
        return {**value, "value": int(given)}
    if isinstance(given, list) and any(isinstance(item, bool) for item in given):
        return {**value, "value": [int(item) if isinstance(item, bool) else item for item in given]}
    return value


class QueryRequest(BaseModel):
    """A query; an unknown field is an error (a misspelled ``filter`` or ``topk`` would
    otherwise answer 200 with unfiltered results or the default count)."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS, description="the question or text to search for")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, strict=True, description="how many results to return")
    filters: MetadataFilters | None = Field(
        None, description='LlamaIndex metadata filters, e.g. {"filters": [{"key": "file_type", '
        '"value": "md", "operator": "=="}], "condition": "and"}'
    )
    mode: QueryMode | None = Field(
        None, description="'dense', 'sparse' (BM25 keywords) or 'hybrid'; default: the index's "
        "default (GET /health shows it and the modes the index supports)"
    )
    # strict, as top_k: "yes" or "0.5" as text would otherwise be read as true or 0.5
    alpha: float | None = Field(
        None, ge=0.0, le=1.0, strict=True, description="hybrid only: weight of the dense side (1 = dense only)"
    )
    rerank: bool | None = Field(
        None, strict=True, description="rerank the best hits by the decoder's likelihood of the query given each "
        "(about a second per query on a 2-core CPU); default: the index's setting (GET /health shows it)"
    )

    @field_validator("filters", mode="before")
    @classmethod
    def _known_filter_fields(cls, value: Any) -> Any:
        _check_filter_fields(value)
        return _booleans_as_numbers(value)

    def search_request(self) -> SearchRequest:
        """This request as the query path takes it."""
        return SearchRequest(self.query, self.top_k, self.filters, self.mode, self.alpha, self.rerank)


class QueryResult(BaseModel):
    node_id: str
    doc_id: str | None
    score: float | None
    text: str
    metadata: dict[str, Any]


class QueryResponse(BaseModel):
    results: list[QueryResult]
    version: int | None = Field(None, description="the index version that answered")
    warnings: list[str] = Field(
        default_factory=list, description="what the client should know about this answer: a query "
        "longer than the encoder's window (its vector stands for its beginning only), an encoder that "
        "embeds unlike the index's vectors (dense scores unreliable), or an answer from an older "
        "version because a newer one could not be loaded"
    )


class IndexHolder:
    """The live :class:`OpenIndex`, replaced atomically when a new version appears.

    ``clock`` (seconds, monotonic) is injectable so that tests can step through the back-off.
    """

    def __init__(self, index_dir: Path, settings: Settings | None, current: OpenIndex | None = None,
                 *, clock: Callable[[], float] = time.monotonic,
                 retry_base: float = RETRY_BASE_S, retry_max: float = RETRY_MAX_S):
        self.index_dir = index_dir
        self.settings = settings
        latest = SegmentStore.current_version(index_dir)
        stamp = SegmentStore.manifest_stamp(index_dir, latest) if latest is not None else None
        self.current = current or open_index(index_dir, settings, check_encoder=False)
        # Which manifest file the served version was read from: an index removed and created
        # again starts at version 1 again, so the number alone would keep the old one served.
        self.stamp = stamp if latest == self.current.version else None
        self.clock = clock
        self.retry_base, self.retry_max = retry_base, retry_max
        # A newer version that failed to load (e.g. a file still being copied, or corrupt):
        # retried with back-off, and reported by /health meanwhile.
        self.failed_version: int | None = None
        self.failure: str | None = None
        self.attempts = 0
        self.next_retry = 0.0
        # Why the files of the served version are no longer what it loaded (None: intact), and
        # whether that changes what it reads (a resized file, mapped in place).
        self.damage: str | None = None
        self.unsafe = False
        self.checked_at = -math.inf
        # Whether the encoder still gives the vectors the served version recorded for its check
        # texts (None: none recorded); run once per distinct record.
        self.encoder_check: EncoderCheck | None = None
        self._checked_record: dict[str, Any] | None = None
        self.check_encoder()

    def refresh(self) -> bool:
        """Load the newest version if it differs from the one served; True if swapped.

        A version that cannot be loaded leaves the served one in place; the error is kept in
        :attr:`failure` and the load retried after a back-off that doubles with each failure.
        The served version's files are checked too (see :meth:`check_served`).
        """
        self.check_served()
        latest = SegmentStore.current_version(self.index_dir)
        if latest is None:
            return False
        stamp = SegmentStore.manifest_stamp(self.index_dir, latest)
        if latest == self.current.version:
            if self.stamp is None:  # an index handed in, or a load that raced a commit: adopt
                self.stamp = stamp
            if stamp is None or stamp == self.stamp:
                return False
        if latest == self.failed_version and self.clock() < self.next_retry:
            return False
        try:
            loaded = open_index(self.index_dir, self.settings, encoder=self.current.encoder, check_encoder=False)
        except Exception as exc:
            self._failed(latest, f"{type(exc).__name__}: {exc}")
            return False
        self.current = loaded  # one reference assignment: requests see old or new, never half
        self.stamp = stamp if loaded.version == latest else None
        self.failed_version = self.failure = self.damage = None
        self.unsafe = False
        self.attempts = 0
        log.info("now serving version %s of %s", loaded.version, self.index_dir)
        self.check_encoder()
        return True

    def check_encoder(self) -> EncoderCheck | None:
        """Compare the encoder with the served version's recorded check, once per record (a
        version that carries the same record is not checked again). A failure is logged as an
        error, makes ``/health`` say ``degraded`` and puts a warning in every dense or hybrid
        answer: the stored vectors are intact, but queries are embedded unlike them."""
        recorded = self.current.store.encoder_check
        if recorded is None or recorded != self._checked_record:
            # open_index may have checked this version already
            self.encoder_check = self.current.encoder_check or self.current.check_encoder()
            self._checked_record = recorded
        else:  # the same record, the same result: the version's answers carry it too
            self.current.encoder_check = self.encoder_check
        return self.encoder_check

    def _failed(self, version: int, failure: str) -> None:
        """Record a failed load of ``version`` and when to try it again."""
        self.attempts = self.attempts + 1 if version == self.failed_version else 1
        self.failed_version, self.failure = version, failure
        delay = min(self.retry_base * 2 ** (self.attempts - 1), self.retry_max)
        self.next_retry = self.clock() + delay
        log.error("cannot load version %s of %s (attempt %d: %s); still serving version %s, "
                  "retrying in %.0f s", version, self.index_dir, self.attempts, failure,
                  self.current.version, delay)

    def check_served(self) -> str | None:
        """Check that the files of the served version are still there at their recorded sizes.

        The service holds the version it loaded, so it keeps answering; but it could not load
        that version again, so it reports itself unhealthy (a stat per file, no checksums).
        """
        manifest = self.current.store.manifest
        if manifest is None:
            return None
        damage = damaged_file(self.index_dir, manifest)
        self.checked_at = self.clock()
        self.unsafe = damage is not None and "was deleted" not in damage
        if damage is not None and damage != self.damage:
            log.error("%s; still serving version %s from memory. %s", damage, self.current.version,
                      damage_advice(self.index_dir))
        self.damage = damage
        return damage


def version_files(index_dir: Path, manifest: Manifest) -> dict[Path, int | None]:
    """Every file a version's manifest names, with its recorded size (None: not recorded).

    Format 1 lists whole-copy files beside the manifest; format 2 names shared segments (under
    ``segments/``), tombstone and document-log files (paths relative to the index) and a
    correction beside the manifest.
    """
    vdir = persist.version_dir(index_dir, manifest.version)
    files: dict[Path, int | None] = {vdir / persist.MANIFEST_FILE: None}
    files.update({vdir / name: record.bytes for name, record in manifest.files.items()})
    for segment in getattr(manifest, "segments", []):
        folder = index_dir / "segments" / segment.name
        files.update({folder / name: record.bytes for name, record in segment.files.items()})
        if segment.deletes is not None:
            files[index_dir / segment.deletes.path] = segment.deletes.bytes
    files.update({index_dir / named.path: named.bytes for named in getattr(manifest, "docs", [])})
    correction = getattr(manifest, "correction", None)
    if correction is not None:
        files[vdir / "correction.json"] = correction.bytes
    return files


def token_matches(given: str, token: str) -> bool:
    """Whether a request's bearer token is ``token``, in constant time. Compared as bytes: the
    header arrives decoded as Latin-1 (its raw bytes) and the configured token is UTF-8, and
    ``hmac.compare_digest`` raises on non-ASCII text (a 500 for a client's odd header, and no
    client at all could pass a non-ASCII token)."""
    return hmac.compare_digest(given.encode("latin-1", "replace"), token.encode("utf-8", "surrogateescape"))


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine (``localhost``, 127.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def damaged_file(index_dir: Path, manifest: Manifest) -> str | None:
    """The first file of a version that is missing or not at its recorded size, said plainly."""
    for path, size in sorted(version_files(index_dir, manifest).items()):
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            return f"{path} of version {manifest.version} was deleted"
        except OSError as exc:
            return f"{path} of version {manifest.version} cannot be read ({exc})"
        if size is not None and actual != size:
            return (f"{path} of version {manifest.version} has {actual} bytes, not the "
                    f"{size} its manifest recorded (truncated or overwritten)")
    return None


class QueryBatcher:
    """Serves concurrent ``/query`` requests in batches: one encoder pass for all the queries
    that arrived while the previous batch was computing. No request waits for a timer: a lone
    request is served at once; under load, batches grow by themselves.

    Batches run on ``model_thread`` (see :func:`model_thread`). A reranked request takes
    seconds on a CPU, so it is answered beside the batches rather than in one, on a thread of
    its own: the queries behind it do not wait for it (the reranker gives the model back
    between its passes; see ``QueryLikelihoodScorer.batch_tokens``).
    """

    def __init__(self, max_batch: int = 32, model_thread: Executor | None = None):
        self.max_batch = max_batch
        self._model_thread = model_thread
        self._queue: asyncio.Queue[tuple[OpenIndex, QueryRequest, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._reranking: set[asyncio.Task] = set()

    async def search(self, index: OpenIndex, request: QueryRequest) -> list[dict[str, Any]]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((index, request, future))
        return await future

    async def close(self) -> None:
        for task in [self._worker, *self._reranking]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            groups: dict[int, list[tuple[OpenIndex, QueryRequest, asyncio.Future]]] = {}
            for item in batch:  # requests pinned to different versions are searched apart
                groups.setdefault(id(item[0]), []).append(item)
            for items in groups.values():
                index, plain = items[0][0], []
                for item in items:
                    if index.reranks(item[1].rerank):
                        task = asyncio.create_task(self._answer([item], beside=True))
                        self._reranking.add(task)
                        task.add_done_callback(self._reranking.discard)
                    else:
                        plain.append(item)
                if plain:
                    await self._answer(plain)

    async def _answer(self, items: list[tuple[OpenIndex, QueryRequest, asyncio.Future]], beside: bool = False) -> None:
        index = items[0][0]
        requests = [r.search_request() for _, r, _ in items]
        loop = asyncio.get_running_loop()
        executor = None if beside else self._model_thread  # None: asyncio's own threads

        def search(batch: list[SearchRequest]) -> asyncio.Future[list[Any]]:
            return loop.run_in_executor(executor, index.search_many, batch)

        try:
            results: list[Any] = await search(requests)
        except Exception as exc:
            if len(requests) == 1:  # nothing to separate: a lone request is not run again
                results = [exc]
            else:  # one bad request (e.g. an unsupported filter) must not fail the others
                results = []
                for request in requests:
                    try:
                        results.append((await search([request]))[0])
                    except Exception as failure:
                        results.append(failure)
        for (_, _, future), result in zip(items, results, strict=True):
            if future.done():  # the client went away
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def model_thread() -> ThreadPoolExecutor:
    """The one thread on which the service runs everything that may run the model: loading a
    version (and its encoder), checking the encoder, embedding queries.

    Why one: libgomp, torch's OpenMP on Linux, stops its threads from spinning between parallel
    regions once a process holds more OpenMP threads than cores, and every thread that runs a
    parallel region keeps a team of its own. A query embedded on one thread took 25.5 ms; once a
    second thread had run one, 35 ms (2 cores; ``htp_embed.threads`` says why the spin matters).
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="htp-model")


def _warm_up(index: OpenIndex) -> None:
    """Run the encoder's query widths once, so that the first queries after a start do not
    each pay for compiling their kernels (~7 ms a new width on the CPU; ~0.5 s in all).

    Best effort: a warm-up that fails is logged and the service starts without it (the
    queries themselves then report whatever is wrong, as they did before it existed)."""
    began = time.perf_counter()
    try:
        widths = index.encoder.warm_query_widths()
    except (RuntimeError, ValueError) as exc:
        log.warning("the query warm-up failed (%s: %s); serving without it", type(exc).__name__, exc)
        return
    if widths:
        log.info("warmed up %d query widths in %.2f s", widths, time.perf_counter() - began)


def create_app(
    index_dir: str | Path,
    settings: Settings | None = None,
    *,
    reload_interval: float = 2.0,
    api_token: str | None = None,
    holder: IndexHolder | None = None,
    max_batch: int = 32,
    warm_up: bool = True,
) -> FastAPI:
    """The FastAPI app serving ``index_dir``. ``api_token`` (or ``$HTP_INDEX_API_TOKEN``)
    requires ``Authorization: Bearer <token>`` on /query (and for /health's details).
    ``warm_up`` runs the query widths' first passes before the app answers (see :func:`_warm_up`)."""
    model = model_thread()
    holder = holder or model.submit(IndexHolder, Path(index_dir), settings).result()
    if holder.current.default_rerank:
        # Every default query reranks: a model that cannot (an untied output head) is refused
        # here, not with a 409 on each query of a service whose /health said "ok".
        model.submit(lambda: holder.current.reranker).result()
    if warm_up:
        model.submit(_warm_up, holder.current).result()
    token = api_token if api_token is not None else os.environ.get(TOKEN_ENV) or None

    batcher = QueryBatcher(max_batch, model)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_watch(holder, reload_interval, model)) if reload_interval > 0 else None
        yield
        await batcher.close()
        if watcher:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    app = FastAPI(
        title="htp-index query service",
        description="Retrieval over an htp-index FAISS index for RAG apps.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.holder = holder
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None) -> bool:
        return token is None or (credentials is not None and token_matches(credentials.credentials, token))

    async def authorise(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not authorised(credentials):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and a lone surrogate in it (valid JSON
        # "\ud800", not UTF-8), a body that is not UTF-8, or a NaN made rendering the 422 fail.
        return JSONResponse({"detail": jsonable_encoder(_printable(exc.errors()))}, status_code=422)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is None and request.method == "POST":
            # A chunked body has no declared size to check before reading it.
            return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        if request.method == "POST":
            # FastAPI answers a body that is not UTF-8 with a bare 400 "There was an error
            # parsing the body"; say what is wrong, with the 422 other malformed bodies get
            body = await request.body()  # at most MAX_BODY_BYTES; kept for the endpoint
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                return JSONResponse({"detail": f"request body is not UTF-8 (byte {body[exc.start]:#04x} at offset "
                                               f"{exc.start}); send the JSON as UTF-8"}, status_code=422)
        return await call_next(request)

    @app.get("/health", responses={503: {"description": "the served version's files are damaged"}})
    async def health(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> JSONResponse:
        """The service's state. Open to load balancers' probes: with a token configured, a
        request without it gets the status alone (the rest names the index's path, its files and
        their errors)."""
        index = holder.current
        await asyncio.to_thread(holder.check_served)
        drifted = holder.encoder_check is not None and not holder.encoder_check.passed
        # Files of the served version removed by retention while a newer version is live: the
        # service is behind (it answers from the files it holds open, and loads the newer one
        # at its next reload), not broken; a 503 took it out of a load balancer for that.
        superseded = (holder.damage is not None and not holder.unsafe
                      and (persist.current_version(holder.index_dir) or 0) > index.version)
        damaged = holder.damage is not None and not superseded
        status = ("unhealthy" if damaged else "stale" if holder.failure or superseded
                  else "degraded" if drifted else "ok")
        body: dict[str, Any] = {
            "status": status,
            "index": str(index.path),
            "version": index.version,
            "count": index.store.count,
            "encoder": index.encoder.describe(),
            "modes": index.modes,
            "default_mode": index.resolve_mode(None),
            "rerank": index.default_rerank,
            "encoder_check": None if holder.encoder_check is None else holder.encoder_check.summary(),
        }
        if holder.failure is not None:
            body["newer_version"] = holder.failed_version
            body["newer_version_error"] = holder.failure
            body["retry_in_s"] = round(max(holder.next_retry - holder.clock(), 0.0), 1)
        if holder.damage is not None:
            body["reason"] = holder.damage + (
                f"; version {persist.current_version(holder.index_dir)} is live and is loaded at the next reload"
                if superseded else "")
        if not authorised(credentials):
            body = {"status": status}
        return JSONResponse(body, status_code=503 if damaged else 200)

    @app.post("/query", response_model=QueryResponse, dependencies=[Depends(authorise)])
    async def query(request: QueryRequest) -> QueryResponse:
        index = holder.current  # pinned for the whole request
        if holder.clock() - holder.checked_at > DAMAGE_CHECK_S:
            await asyncio.to_thread(holder.check_served)
        if holder.unsafe and holder.current is index:
            raise HTTPException(status_code=503, detail=(
                f"the index at {index.path} cannot answer: {holder.damage}. "
                f"{damage_advice(index.path)}"))
        try:
            # refused before it joins a batch (a bad request in a batch makes it run one by one)
            index.check_request(request.search_request())
            results = await batcher.search(index, request)
        except (SparseIndexMissingError, RerankUnavailableError) as exc:  # what this index cannot do
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        except ValueError as exc:  # e.g. an unsupported filter operator
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        except (HtpIndexError, OSError, sqlite3.DatabaseError) as exc:
            # Files of the served version damaged under the service (a segment read in place).
            damage = await asyncio.to_thread(holder.check_served)
            log.error("query failed on version %s: %s: %s", index.version, type(exc).__name__, exc)
            raise HTTPException(status_code=503, detail=(
                f"the index at {index.path} cannot answer: {damage or f'{type(exc).__name__}: {exc}'}. "
                f"{damage_advice(index.path)}")) from exc
        warnings = await _query_warnings(holder, index, request)
        return QueryResponse(results=[QueryResult(**r) for r in results], version=index.version, warnings=warnings)

    return app


async def _query_warnings(holder: IndexHolder, index: OpenIndex, request: QueryRequest) -> list[str]:
    """What a client should know about how its query was answered (:meth:`OpenIndex.query_warnings`:
    a query cut to fit the encoder's window, an encoder that embeds unlike the index's), and that
    the answer comes from an older version than the one published when a newer one failed to load:
    ``/health`` said all this, but an app that only queries was told nothing."""
    if index.encoder.may_truncate_query(request.query):  # tokenising a long query is work
        warnings = await asyncio.to_thread(index.query_warnings, request.query, request.mode, request.rerank)
    else:
        warnings = index.query_warnings(request.query, request.mode, request.rerank)  # the usual query: no work
    failed = holder.failed_version
    if failed is not None and index.version is not None and failed > index.version:
        warnings.append(f"answered from version {index.version}: version {failed} is published but could not "
                        f"be loaded ({holder.failure}); the service retries it (GET /health)")
    return warnings


def _printable(value: Any) -> Any:
    """``value`` as JSON can carry it: lone surrogates and undecodable bytes replaced by U+FFFD,
    NaN and infinities (which Python's JSON parser accepts in a body) spelled as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list | tuple):
        return [_printable(item) for item in value]
    if isinstance(value, dict):
        return {_printable(key): _printable(item) for key, item in value.items()}
    return value


async def _watch(holder: IndexHolder, interval: float, model: Executor | None = None) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.get_running_loop().run_in_executor(model, holder.refresh)
        except Exception:  # e.g. CURRENT itself unreadable: keep serving the old version; say why
            log.exception("could not check %s for a new version; still serving %s", holder.index_dir, holder.current.version)


def listening_socket(host: str, port: int) -> socket.socket:
    """The service's socket, bound before the index and the encoder load: uvicorn bound it
    after them, so a port in use failed seconds later with uvicorn's exit code 3 (the code
    htp-index gives a run where some documents failed). A port in use is a failed run (exit
    1, it may be free later); an address this machine lacks, or a port it may not take, is bad
    usage (`ServiceAddressError`, exit 2)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as exc:
        sock.close()
        raise ServiceAddressError(f"cannot listen on {host}:{port}: {host!r} is not an address or host name "
                                  f"this machine resolves ({exc.strerror})") from exc
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(f"cannot listen on {where}: the port is in use (another service, or an "
                                 "htp-index serve still running); choose another with --port") from exc
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EACCES:
            reason += " (a port below 1024 needs the right to bind it)"
        raise ServiceAddressError(f"cannot listen on {where}: {reason}; choose another --host or --port") from exc
    sock.set_inheritable(True)
    return sock


def serve(index_dir: str | Path, settings: Settings | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          reload_interval: float = 2.0, max_batch: int = 32) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    if not is_loopback(host) and not os.environ.get(TOKEN_ENV):
        log.warning("serving %s on %s without %s: anyone who can reach this address can query the index "
                    "and read its text; set the variable to require a bearer token", index_dir, host, TOKEN_ENV)
    sock = listening_socket(host, port)
    try:
        bound_host, bound_port = sock.getsockname()[:2]
        url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
        # "listening on" came first, ~17 s before a connection was answered: it is said once loaded.
        log.info("loading %s and its encoder, then serving on %s", index_dir, url)
        app = create_app(index_dir, settings, reload_interval=reload_interval, max_batch=max_batch)
        log.info("listening on %s", url)
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
