"""The HTTP query service for RAG apps in other processes (FastAPI).

``POST /query`` embeds the query with the index's own encoder and searches the live version;
``GET /health`` reports the version served. A watcher notices when ingest or rebuild switches
in a new version, loads it beside the old one, and swaps a single reference, so requests in
flight finish on the version they started with and none is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from llama_index.core.vector_stores.types import MetadataFilters
from pydantic import BaseModel, Field

from indexes import FaissVectorStore, SparseIndexMissingError
from pipelines.query import OpenIndex, QueryMode, SearchRequest, open_index
from pipelines.settings import Settings

log = logging.getLogger(__name__)

MAX_QUERY_CHARS = 4096
MAX_TOP_K = 100
MAX_BODY_BYTES = 64 * 1024
TOKEN_ENV = "HTP_INDEX_API_TOKEN"


class QueryRequest(BaseModel):
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS, description="the question or text to search for")
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many results to return")
    filters: MetadataFilters | None = Field(
        None, description='LlamaIndex metadata filters, e.g. {"filters": [{"key": "file_type", '
        '"value": "md", "operator": "=="}], "condition": "and"}'
    )
    mode: QueryMode | None = Field(
        None, description="'dense', 'sparse' (BM25 keywords) or 'hybrid'; default: the index's "
        "default (GET /health shows it and the modes the index supports)"
    )
    alpha: float | None = Field(
        None, ge=0.0, le=1.0, description="hybrid only: weight of the dense side (1 = dense only)"
    )


class QueryResult(BaseModel):
    node_id: str
    doc_id: str | None
    score: float | None
    text: str
    metadata: dict[str, Any]


class QueryResponse(BaseModel):
    results: list[QueryResult]
    version: int | None = Field(None, description="the index version that answered")


class IndexHolder:
    """The live :class:`OpenIndex`, replaced atomically when a new version appears."""

    def __init__(self, index_dir: Path, settings: Settings | None, current: OpenIndex | None = None):
        self.index_dir = index_dir
        self.settings = settings
        self.current = current or open_index(index_dir, settings)
        # A newer version that failed to load (e.g. a corrupt file): not retried until
        # CURRENT moves on, and reported by /health.
        self.failed_version: int | None = None
        self.failure: str | None = None

    def refresh(self) -> bool:
        """Load the newest version if it differs from the one served; True if swapped.

        A version that cannot be loaded leaves the served one in place; the error is logged
        once and kept in :attr:`failure`.
        """
        latest = FaissVectorStore.current_version(self.index_dir)
        if latest is None or latest == self.current.version or latest == self.failed_version:
            return False
        try:
            loaded = open_index(self.index_dir, self.settings, embedding=self.current.embedding)
        except Exception as exc:
            self.failed_version, self.failure = latest, f"{type(exc).__name__}: {exc}"
            log.error("cannot load version %s of %s (%s); still serving version %s",
                      latest, self.index_dir, self.failure, self.current.version)
            return False
        self.current = loaded  # one reference assignment: requests see old or new, never half
        self.failed_version = self.failure = None
        log.info("now serving version %s of %s", loaded.version, self.index_dir)
        return True


class QueryBatcher:
    """Serves concurrent ``/query`` requests in batches: one encoder pass for all the queries
    that arrived while the previous batch was computing. No request waits for a timer: a lone
    request is served at once; under load, batches grow by themselves."""

    def __init__(self, max_batch: int = 32):
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[OpenIndex, QueryRequest, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    async def search(self, index: OpenIndex, request: QueryRequest) -> list[dict[str, Any]]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._serve())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((index, request, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

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
                await self._answer(items)

    @staticmethod
    async def _answer(items: list[tuple[OpenIndex, QueryRequest, asyncio.Future]]) -> None:
        index = items[0][0]
        requests = [SearchRequest(r.query, r.top_k, r.filters, r.mode, r.alpha) for _, r, _ in items]
        try:
            results: list[Any] = await asyncio.to_thread(index.search_many, requests)
        except Exception:
            # One bad request (e.g. an unsupported filter) must not fail the others.
            results = []
            for request in requests:
                try:
                    results.append(await asyncio.to_thread(index.search_many, [request]))
                    results[-1] = results[-1][0]
                except Exception as exc:
                    results.append(exc)
        for (_, _, future), result in zip(items, results, strict=True):
            if future.done():  # the client went away
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


def create_app(
    index_dir: str | Path,
    settings: Settings | None = None,
    *,
    reload_interval: float = 2.0,
    api_token: str | None = None,
    holder: IndexHolder | None = None,
    max_batch: int = 32,
) -> FastAPI:
    """The FastAPI app serving ``index_dir``. ``api_token`` (or ``$HTP_INDEX_API_TOKEN``)
    requires ``Authorization: Bearer <token>`` on /query."""
    holder = holder or IndexHolder(Path(index_dir), settings)
    token = api_token if api_token is not None else os.environ.get(TOKEN_ENV) or None

    batcher = QueryBatcher(max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_watch(holder, reload_interval)) if reload_interval > 0 else None
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

    async def authorise(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials, token):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is None and request.method == "POST":
            # A chunked body has no declared size to check before reading it.
            return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        index = holder.current
        body: dict[str, Any] = {
            "status": "ok" if holder.failure is None else "stale",
            "index": str(index.path),
            "version": index.version,
            "count": index.store.count,
            "encoder": index.embedding.model_name,
            "modes": index.modes,
            "default_mode": index.resolve_mode(None),
        }
        if holder.failure is not None:
            body["newer_version"] = holder.failed_version
            body["newer_version_error"] = holder.failure
        return body

    @app.post("/query", response_model=QueryResponse, dependencies=[Depends(authorise)])
    async def query(request: QueryRequest) -> QueryResponse:
        index = holder.current  # pinned for the whole request
        try:
            results = await batcher.search(index, request)
        except SparseIndexMissingError as exc:  # keyword search asked of an older index
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        except ValueError as exc:  # e.g. an unsupported filter operator
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return QueryResponse(results=[QueryResult(**r) for r in results], version=index.version)

    return app


async def _watch(holder: IndexHolder, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(holder.refresh)
        except Exception:  # e.g. CURRENT itself unreadable: keep serving the old version; say why
            log.exception("could not check %s for a new version; still serving %s", holder.index_dir, holder.current.version)


def serve(index_dir: str | Path, settings: Settings | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          reload_interval: float = 2.0, max_batch: int = 32) -> None:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    app = create_app(index_dir, settings, reload_interval=reload_interval, max_batch=max_batch)
    uvicorn.run(app, host=host, port=port, log_level="info")
