"""The `htp-index` command: a thin layer over pipelines/ and flows/.

Exit codes: 0 success; 1 the run failed and the index is unchanged; 2 bad usage;
3 the run finished but some documents failed (they are listed; the rest were indexed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from htp_cli.failure import JsonFailureGroup, describe, print_json_failure
from htp_cli.failure import fail as _fail
from htp_embed.threads import default_openmp_waiting

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
default_openmp_waiting()  # must precede loading OpenMP (faiss, torch)

app = typer.Typer(
    name="htp-index",
    cls=JsonFailureGroup,
    help="Index documents for retrieval-augmented generation with the HTP encoder and FAISS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
out = Console()

EXIT_PARTIAL = 3

IndexOpt = Annotated[Path, typer.Option("--index", "-i", help="index directory (created by ingest)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file (default: ./htp-index.toml or $HTP_INDEX_CONFIG)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="'gemma3-270m', 'smollm2-135m', a local HF model directory or a .gguf file")]
MethodOpt = Annotated[str | None, typer.Option("--method", help="htp, vanilla, last, echo, tp or prompteol")]
KOpt = Annotated[str | None, typer.Option("--k", help="HTP sentences per block: an integer or 'adaptive[:MAX_BLOCKS]' (method htp only: refused with another)")]
KindOpt = Annotated[str | None, typer.Option("--index-kind", help="auto (exact segments, IVF with a calibrated nprobe once a segment is large), flat, hnsw, ivf_flat, ivf_pq or a FAISS factory string (default: the settings' index_kind where set, else the index's own kind, else auto)")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto (cuda if a GPU is visible, else cpu), cpu, cuda, cuda:N, mps, xpu or xpu:N; one this PyTorch cannot run on is refused (exit 2)")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="the encoder's precision: auto (bfloat16 on cuda; on a CPU whichever a short probe measured faster, see `htp-index info`), float32 (the exact reference), bfloat16 or float16; never changes which index the encoder may serve")]


def _task_runner(value: str | None) -> str | None:
    """A misspelled runner is a usage error before any work (exit 2, not a failed run's 1)."""
    from flows.runner_spec import check_task_runner

    try:
        return None if value is None else check_task_runner(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


TaskRunnerOpt = Annotated[str | None, typer.Option(
    callback=_task_runner, help="run as a Prefect flow with this task runner: 'thread', 'thread=N', 'dask' (local "
    "worker processes), 'dask=N' (N of them, at least 1) or 'dask=tcp://HOST:8786' (a running cluster: "
    "SCHEME://HOST:PORT or HOST:PORT; anything else is refused before any work)")]


class Mode(StrEnum):
    """Query modes, as the command line spells them."""

    dense = "dense"
    sparse = "sparse"
    hybrid = "hybrid"


ModeOpt = Annotated[Mode | None, typer.Option("--mode", help="dense (vectors), sparse (BM25 keywords) or hybrid (both fused); default: settings' query_mode (hybrid)")]
AlphaOpt = Annotated[float | None, typer.Option("--alpha", min=0.0, max=1.0, help="hybrid: weight of the dense side, 1 = dense only, 0 = keywords only (default: the tuned value)")]


def _setup(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("httpx", "transformers", "prefect", "faiss", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _settings(config: Path | None, *, as_json: bool = False, **overrides: Any):
    from pipelines.settings import load_settings

    try:
        return load_settings(config, **overrides)
    except Exception as exc:
        # one line (pydantic's own rendering echoes the input and a documentation link)
        console.print(f"[red]error:[/red] {escape(describe(exc))}", highlight=False, soft_wrap=True)
        if as_json:  # stdout was empty: a script reading --json output had nothing to parse
            print_json_failure(describe(exc), 2)
        raise typer.Exit(2) from exc


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def _print_stats(stats: dict[str, Any], as_json: bool, title: str) -> None:
    keys = ("added", "updated", "deleted", "unchanged", "failed", "nodes_embedded", "seconds")
    if as_json:  # every figure the run produced, the version it made live included
        # "ok" as every command's object says it: true for exit 0; a partial run (exit 3) says
        # false with its exit code, as a failure does, beside its figures and errors
        partial = {"ok": False, "exit_code": EXIT_PARTIAL} if stats["failed"] else {"ok": True}
        out.print_json(json.dumps({**partial, **stats}))
        return
    table = Table(title=escape(title), show_header=False)
    table.add_column("stat", style="bold")
    table.add_column("value", justify="right")
    for key in (*keys, *(["nodes_truncated"] if stats.get("nodes_truncated") else []), "tokens", "version", "count"):
        value = stats[key]
        table.add_row(key.replace("_", " "), f"{value:.1f}" if isinstance(value, float) else str(value))
    out.print(table)
    for error in stats["errors"][:20]:
        out.print(f"[yellow]failed[/yellow] {escape(str(error['doc_id']))}: {escape(str(error['error']))}")
    if len(stats["errors"]) > 20:
        out.print(f"… and {len(stats['errors']) - 20} more failures (use --json for all)")


def _run_with_progress(run, description: str, show: bool):
    if not show:
        # --json: stdout carries the JSON alone, whatever a library prints
        with contextlib.redirect_stdout(sys.stderr):
            return run(None, None)
    with _progress() as progress:
        task = progress.add_task(description, total=None)
        return run(
            lambda n: progress.advance(task, n),
            lambda total: progress.update(task, total=total),
        )


EXCLUDE_HELP = ("a glob pattern of files or folders of a source folder (refused with a one-file source) to leave out without a report, as .gitignore "
                "writes it ('*.png', 'drafts/', 'notes/*.md'); repeat for more (default: the settings' exclude). An "
                "indexed document under one is treated as a missing one: deleted, or kept with --keep-missing")
ExcludeOpt = Annotated[list[str] | None, typer.Option("--exclude", help=EXCLUDE_HELP)]


def _exclude_needs_a_folder(exclude: list[str] | None, source: str | None) -> None:
    """Refuse --exclude with a source that is one file: ``ingest recs.jsonl --exclude '*.jsonl'``
    indexed the file anyway, the patterns ignored without a word (they apply to a folder's files)."""
    if not exclude or not source:
        return
    from pipelines.sources import source_kind

    if source_kind(source) in ("file", "jsonl"):
        raise typer.BadParameter(f"--exclude applies to a source folder's files; {source} is one file: "
                                 "drop --exclude, or name the folder")


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="a folder (txt, md, rst, html, pdf, jsonl; recursive) or a BEIR-style .jsonl file: documents missing from it are deleted (see --keep-missing); or one document file, added or updated beside the others")],
    index: IndexOpt,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    method: MethodOpt = None,
    k: KOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    index_kind: KindOpt = None,
    chunk_size: Annotated[int | None, typer.Option(help="tokens per node, at least 32 and at most what the encoder window holds (default: what the index recorded, else fill the encoder window; another size than the index's needs rebuild --source)")] = None,
    keep_missing: Annotated[bool, typer.Option("--keep-missing", help="append-only: keep documents that vanished from the source")] = False,
    exclude: ExcludeOpt = None,
    task_runner: TaskRunnerOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Add new, update changed and remove deleted documents; unchanged ones cost nothing."""
    _setup(verbose, quiet=as_json)
    _exclude_needs_a_folder(exclude, source)
    settings = _settings(
        config, as_json=as_json, encoder_model=model, encoder_method=method, encoder_k=k, encoder_device=device,
        encoder_dtype=dtype, encoder_show_progress=False, index_kind=index_kind, chunk_size=chunk_size,
        delete_missing=False if keep_missing else None, exclude=exclude or None,
    )
    try:
        from pipelines.engine import refuse_options_the_method_ignores
        from pipelines.lock import check_writable

        if task_runner:  # read by each embedding task: a bad value failed every one, retried
            from flows.dask_runner import torch_threads

            torch_threads()
        refuse_options_the_method_ignores(index, settings, {"--k": k})
        check_writable(Path(index))  # before the progress bar, not after it
        if task_runner:
            from flows.ingest import ingest_flow

            stats = ingest_flow(str(source), str(index), settings.to_transport(), task_runner=task_runner)
        else:
            from pipelines.ingest import ingest as run_ingest

            stats = _run_with_progress(
                lambda advance, total: run_ingest(source, index, settings, progress=advance, on_total=total).to_json(),
                "embedding nodes", not as_json,
            )
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    _print_stats(stats, as_json, f"ingest {source} -> {index}")
    if stats["failed"]:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def rebuild(
    index: IndexOpt,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    method: MethodOpt = None,
    k: KOpt = None,
    rewire_start: Annotated[int | None, typer.Option(help="first HTP-rewired layer (0-based; methods htp and tp only)")] = None,
    rewire_stop: Annotated[int | None, typer.Option(help="rewiring stops before this layer (methods htp and tp only)")] = None,
    exit_layer: Annotated[str | None, typer.Option(help="layer to pool: 1-based, negative counts from the end, 'full' = every layer and the final norm, 'default' = the model's")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    index_kind: KindOpt = None,
    source: Annotated[str | None, typer.Option(help="re-read and re-split this source instead of re-embedding the stored nodes")] = None,
    keep_vectors: Annotated[bool, typer.Option("--keep-vectors", help="re-use the stored vectors instead of re-embedding: adds the keyword index (and a vector correction) to an index written by an older htp-index, or changes --index-kind; cannot change the encoder")] = False,
    keep_missing: Annotated[bool, typer.Option("--keep-missing", help="with --source: keep (re-embedded) the indexed documents the source no longer holds, as ingest --keep-missing does; otherwise they are left out and counted as deleted")] = False,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="with --source: " + EXCLUDE_HELP)] = None,
    task_runner: TaskRunnerOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Re-embed everything into a new index version (new model, method, K or index kind).

    The old version keeps serving until the new one is complete and verified."""
    _setup(verbose, quiet=as_json)
    if keep_missing and not source:
        raise typer.BadParameter("--keep-missing goes with --source (a rebuild from the stored nodes keeps every one)")
    if exclude and not source:
        raise typer.BadParameter("--exclude goes with --source (a rebuild from the stored nodes reads no folder)")
    _exclude_needs_a_folder(exclude, source)
    settings = _settings(config, as_json=as_json, encoder_device=device, encoder_dtype=dtype, encoder_show_progress=False,
                         delete_missing=False if keep_missing else None, exclude=exclude or None)
    overrides = {
        "model": model, "method": method, "k": k, "rewire_start": rewire_start,
        "rewire_stop": rewire_stop, "exit_layer": exit_layer,
    }
    if keep_vectors and task_runner:
        raise typer.BadParameter("--keep-vectors embeds nothing, so it takes no --task-runner")
    try:
        from pipelines.engine import refuse_options_the_method_ignores
        from pipelines.lock import check_writable

        if task_runner:  # read by each embedding task: a bad value failed every one, retried
            from flows.dask_runner import torch_threads

            torch_threads()
        refuse_options_the_method_ignores(
            index, settings, {"--k": k, "--rewire-start": rewire_start, "--rewire-stop": rewire_stop}, overrides)
        if exit_layer is not None:  # a word that is no layer: refused before the progress bar, not after it
            from htp_embed.config import EncoderConfig

            EncoderConfig(exit_layer=exit_layer)
        check_writable(Path(index))  # before the progress bar, not after it
        if task_runner:
            from flows.rebuild import rebuild_flow

            stats = rebuild_flow(
                str(index), settings.to_transport(), encoder_overrides=overrides,
                index_kind=index_kind, source=source, task_runner=task_runner,
            )
        else:
            from pipelines.rebuild import rebuild as run_rebuild

            stats = _run_with_progress(
                lambda advance, total: run_rebuild(
                    index, settings, encoder_overrides=overrides, index_kind=index_kind, source=source,
                    progress=advance, on_total=total, keep_vectors=keep_vectors,
                ).to_json(),
                "re-embedding nodes", not as_json,
            )
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    _print_stats(stats, as_json, f"rebuild {index}")
    if stats["failed"]:
        raise typer.Exit(EXIT_PARTIAL)


def _parse_filters(pairs: list[str]):
    if not pairs:  # LlamaIndex's types take seconds to import; a query without filters needs none
        return None
    from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

    filters = []
    for pair in pairs:
        # The first operator in the text splits it (the longest one at that place): a value may
        # hold operator characters ("title=a<=b" is title == "a<=b"), a key may not.
        match = _FILTER.match(pair)
        if match is None or not match["key"].strip():
            raise typer.BadParameter(f"filter {pair!r} must look like key=value, key!=value, key>3, key~=value …")
        # Spaces around an unquoted value are the command line's ("s = a" meant "a" and found
        # nothing); a value with spaces of its own is quoted: s=" a"
        op, value = match["op"], match["value"].strip()
        parsed: Any = value
        with contextlib.suppress(json.JSONDecodeError):
            parsed = json.loads(value)
        if isinstance(parsed, dict):
            # an object in a JSONL record's metadata is kept as its JSON text (sources), written so
            parsed = json.dumps(parsed, ensure_ascii=False, sort_keys=True)
        if isinstance(parsed, bool):
            # LlamaIndex's filters take no booleans (public=true was a traceback, exit 1); the
            # store compares a stored boolean as 0/1, so true is 1
            parsed = int(parsed)
        # ~= is LlamaIndex's "contains": a list value (a JSONL record's tags) holding the value;
        # = compares the whole value, so tags=pets matches no list, as in LlamaIndex
        key, operator = match["key"].strip(), {"=": "==", "~=": "contains"}.get(op, op)
        try:
            if operator in ("==", "!=", "contains") and not isinstance(parsed, str) and _scalar(parsed):
                # title=1984 must find the text "1984" (JSONL and file metadata are text) as
                # well as the number: == and contains match either, != neither.
                # A whole number past 64 bits (a long id such as 123456789012345678901234) is
                # no integer metadata holds: its numeric half is the float a stored one reads as.
                number = float(parsed) if isinstance(parsed, int) and not -(2**63) <= parsed < 2**63 else parsed
                both = [MetadataFilter(key=key, value=number, operator=operator),
                        MetadataFilter(key=key, value=value, operator=operator)]
                filters.append(MetadataFilters(filters=both, condition="and" if operator == "!=" else "or"))
            else:
                filters.append(MetadataFilter(key=key, value=parsed, operator=operator))
        except ValueError as exc:  # pydantic's ValidationError: a value LlamaIndex's filters cannot hold
            raise typer.BadParameter(f"filter {pair!r}: its value must be text, a number, or a list of "
                                     f"one of them ({exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc})") from exc
    return MetadataFilters(filters=filters) if filters else None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float)


_FILTER = re.compile(r"(?P<key>.*?)(?P<op>!=|>=|<=|==|~=|=|>|<)(?P<value>.*)\Z", re.DOTALL)


@app.command()
def query(
    text: Annotated[str, typer.Argument(help="the query")],
    index: IndexOpt,
    top_k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=1000, help="results to return")] = 5,
    filter_: Annotated[list[str] | None, typer.Option("--filter", "-f", help="metadata filter key=value (also != > >= < <=; key~=value: a list "
        "value such as a JSONL record's tags holds value, where tags=pets matches no list); repeat to AND")] = None,
    mode: ModeOpt = None,
    alpha: AlphaOpt = None,
    rerank: Annotated[bool | None, typer.Option(
        "--rerank/--no-rerank", help="rerank the best hits (settings' rerank_depth, default 10) by the "
        "decoder's likelihood of the query given each: +2.6 NDCG@10 on SciFact for ~1 s more on a "
        "2-core CPU (default: settings' rerank, off)")] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Search an index and print ranked results with scores."""
    _setup(verbose, quiet=True)
    settings = _settings(config, as_json=as_json, encoder_device=device, encoder_dtype=dtype, encoder_show_progress=False)
    filters = _parse_filters(filter_ or [])
    if (mode.value if mode else settings.query_mode) != "sparse":
        from htp_embed.text_ahead import prepare_query

        # Tokens and sentences in a side process, beside torch's import (htp_embed.text_ahead);
        # the index's own encoder settings are read later: where they differ, that work is
        # simply done again here.
        prepare_query(settings.encoder, [text])
    try:
        from pipelines.query import open_index

        # no encoder check on this cold path: it would load spaCy here (ingest and serve check);
        # the encoder loads when the query needs it (a keyword-only query does not)
        opened = open_index(index, settings, check_encoder=False, lazy_encoder=True)
        results = opened.search(
            text, top_k, filters, mode=mode.value if mode else None, alpha=alpha, rerank=rerank,
        )
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    warnings = opened.query_warnings(text, mode.value if mode else None, rerank)
    if as_json:  # the service's answer's fields
        out.print_json(json.dumps({"ok": True, "results": results, "warnings": warnings}))
        return
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    table = Table(title=escape(f"{text!r} in {index}"))  # stored and typed text is shown, never read as markup
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("document")
    table.add_column("text")
    for rank, hit in enumerate(results, start=1):
        snippet = " ".join(hit["text"].split())
        table.add_row(str(rank), f"{hit['score']:.4f}", escape(str(hit["doc_id"])),
                      escape(snippet[:160] + ("…" if len(snippet) > 160 else "")))
    out.print(table)


@app.command()
def serve(
    index: IndexOpt,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default; 0.0.0.0 exposes it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one)")] = 8000,
    reload_interval: Annotated[float, typer.Option(min=0.0, help="seconds between checks for a new index version (0: never)")] = 2.0,
    max_batch: Annotated[int, typer.Option(min=1, help="most concurrent queries embedded in one encoder pass (1: one at a time)")] = 32,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve POST /query and GET /health over HTTP (OpenAPI docs at /docs).

    Set HTP_INDEX_API_TOKEN to require a bearer token. On a CPU it first embeds a made-up
    query at each short query width (~0.5 s), so that its first queries are as fast as the rest."""
    _setup(verbose)
    settings = _settings(config, encoder_device=device, encoder_dtype=dtype, encoder_show_progress=False)
    from pipelines.service import serve as run_service

    try:
        run_service(index, settings, host=host, port=port, reload_interval=reload_interval, max_batch=max_batch)
    except Exception as exc:
        raise _fail(exc) from exc


@app.command()
def info(
    index: IndexOpt,
    as_json: JsonOpt = False,
    drift: Annotated[bool, typer.Option("--drift", help="also read up to 100,000 stored vectors to measure how far they drifted from the vector correction")] = False,
) -> None:
    """Show an index's version, size, kind, encoder and segments, and how this machine runs it.

    Read from the manifest alone (nothing else is loaded; --drift reads stored vectors too):
    the live version, size, kind, encoder (and whether it records an encoder check), segments
    with their FAISS structures (a kind that needs training serves exact search until a segment
    can train it) and vector correction; and how this machine would run the encoder: the dtype,
    Linear packing and attention kernel measured here, and which code runs the decoder
    (htp-index's own Gemma 3 forward pass or transformers' class)."""
    from indexes import SegmentStore

    try:
        manifest = SegmentStore.read_manifest(index)
        store = SegmentStore.open(index, use_gpu=False) if drift else None
        correction = _manifest_correction(index, manifest)
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    summary: dict[str, Any] = {
        "count": manifest.count, "dim": manifest.dim, "version": manifest.version,
        "index_kind": manifest.index_kind, "metric": manifest.metric, "encoder": manifest.encoder,
        "created_at": manifest.created_at, "format": manifest.format_version,
        "segments": len(manifest.segments), "structures": _structures(manifest),
        "deleted_rows": manifest.tombstones,
        "query_modes": ["dense", "sparse", "hybrid"], "correction": correction,
        "correction_kind": manifest.correction_kind,
        "splitting": manifest.splitting,
        "encoder_check": None if manifest.encoder_check is None else {
            "documents": len(manifest.encoder_check["documents"]), "queries": len(manifest.encoder_check["queries"])},
        "dtype_auto": _dtype_auto(manifest.dim),
        "forward_pass": _forward_pass(manifest.encoder),
    }
    if store is not None:
        summary["correction_drift"] = store.correction_drift()
    if as_json:
        out.print_json(json.dumps({"ok": True, **summary}))
        return
    table = Table(title=escape(str(index)), show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a fingerprint or path longer than the terminal: folded, never cut
    for key, value in summary.items():
        table.add_row(key, escape(json.dumps(value) if isinstance(value, dict | list) else str(value)))
    out.print(table)
    if manifest.format_version < 2:
        out.print(f"[yellow]old layout[/yellow] (a full copy per version): `htp-index migrate --index {escape(str(index))}` rewrites it as segments")
    if manifest.encoder_check is None and manifest.count:
        out.print("[yellow]no encoder check recorded[/yellow] (an index from an older htp-index): the next "
                  "ingest records one, so that an encoder changed unnamed by its identity is caught")
    if correction is None and manifest.correction_kind == "none":
        out.print("no vector correction, as chosen (correction 'none'); a rebuild with another "
                  "correction setting fits one")
    elif correction is None and manifest.count:
        from pipelines.correction import MIN_DOCUMENTS

        if manifest.count < MIN_DOCUMENTS:  # a rebuild could not fit one either
            out.print(f"[yellow]no vector correction yet[/yellow]: it needs {MIN_DOCUMENTS} nodes; the ingest that "
                      "brings the index to them fits it")
        else:
            out.print(f"[yellow]no vector correction[/yellow]: fit one with `htp-index rebuild --index {escape(str(index))} --keep-vectors`")


def _dtype_auto(dim: int) -> dict[str, Any]:
    """What dtype 'auto' runs queries in on this CPU, and whether the Linear weights are packed,
    and why: the decisions measured and cached at the encoder's first load here (read from the
    cache folder this folder's settings name; nothing is measured), and the dtype those settings
    run ("runs": a dtype setting overrides the decisions)."""
    from htp_cli.failure import describe
    from htp_embed.config import EncoderSettingError
    from htp_embed.models import dtype_plan
    from htp_embed.precision import (
        ATTENTION_FILE,
        cached_decisions_here,
        cached_packing_here,
        cached_records_here,
        cpu_model,
    )
    from pipelines.settings import load_settings

    runtime: dict[str, Any] | None = None
    try:  # the cache folder and dtype of this folder's settings, as its queries run them
        runtime = load_settings().runtime_encoder_settings()
    except Exception as exc:
        runs = f"unknown: this folder's settings are invalid ({describe(exc)})"
    cache = runtime["cache_dir"] if runtime else None
    found = cached_decisions_here(dim, cache)
    packing = [d for d in cached_packing_here(cache) if f"layers {dim}x" in d["key"]]
    # The attention kernel is keyed by the head layout, not the width: all the layouts measured here.
    attention = cached_records_here(ATTENTION_FILE, "kernel", cache)
    if runtime:
        try:
            runs = dtype_plan(runtime["dtype"], runtime["device"], dim, found)
        except EncoderSettingError as exc:  # a device this PyTorch cannot run on: info still reads the index
            runs = f"none: {describe(exc)}"
    if not found:
        return {"cpu": cpu_model(), "runs": runs, "decision": "not measured yet on this CPU: the first "
                "query or ingest measures it (well under a second) and caches it"}
    return {"cpu": cpu_model(), "runs": runs, "decisions": found, "linear_packing": packing,
            "attention_kernel": attention}


def _forward_pass(recorded: dict[str, Any]) -> str:
    """Which code would run this index's decoder here, under this machine's settings."""
    from htp_cli.failure import describe
    from htp_embed.config import EncoderSettingError
    from htp_embed.models import forward_pass_plan
    from pipelines.settings import load_settings

    try:  # ./htp-index.toml and HTP_INDEX_*: info reads the index whatever they say
        runtime = load_settings().runtime_encoder_settings()
    except Exception as exc:
        return f"unknown: this folder's settings are invalid ({describe(exc)})"
    try:
        return forward_pass_plan(str(recorded.get("model", "")), runtime["device"], runtime["implementation"])
    except EncoderSettingError as exc:  # a device this PyTorch cannot run on: info still reads the index
        return f"none: {describe(exc)}"


def _structures(manifest: Any) -> dict[str, dict[str, int]]:
    """FAISS structure -> its segments and rows: a kind that needs training (ivf_flat, ivf_pq,
    a PQ factory string) serves exact search (a Flat structure) until a segment holds enough
    rows to train it, which the kind's name alone did not show."""
    if manifest.format_version < 2:  # one structure for the whole index
        return {manifest.index_structure: {"segments": 1, "rows": manifest.count}}
    structures: dict[str, dict[str, int]] = {}
    for segment in manifest.segments:
        entry = structures.setdefault(segment.structure, {"segments": 0, "rows": 0})
        entry["segments"] += 1
        entry["rows"] += segment.rows
    return structures


def _manifest_correction(index: Path, manifest: Any) -> dict[str, Any] | None:
    """The correction summary from the version's small correction.json (no vectors read)."""
    from indexes import persist
    from indexes.segment_store import read_correction

    # read as opening reads it: a damaged file is named (a raw pydantic error named nothing)
    correction = read_correction(persist.version_dir(index, manifest.version), manifest)
    return None if correction is None else correction.summary()


@app.command()
def verify(
    index: IndexOpt,
    version: Annotated[int | None, typer.Option(help="check this version instead of the live one")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every file of the live version against the sha256 its manifest recorded.

    Reads the segments, tombstones, document log and correction of the live version. Opening an
    index checks sizes (and hashes only the small correction and tombstone files); run this after
    a disk or copy problem. Exit 1 names a bad file."""
    from pipelines.maintenance import verify_index

    try:
        checked = verify_index(index, version)
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    if as_json:
        out.print_json(json.dumps({"ok": True, **checked}))
    else:
        out.print(f"ok: {checked['files']} files, {checked['bytes']:,} bytes match their checksums")


@app.command()
def compact(
    index: IndexOpt,
    due_only: Annotated[bool, typer.Option("--due-only", help="run only the merges the merge policy has due (what ingest does, plus those too big to run inside a commit) instead of merging everything")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Merge the index's segments and drop deleted rows, as one new version.

    The old version serves until the switch. Ingest already merges small segments when the policy asks.
    Versions are kept and the writer lock waited for as the settings say (`keep_versions`,
    `lock_timeout`)."""
    _setup(verbose)
    settings = _settings(config, as_json=as_json)
    from pipelines.maintenance import compact_index

    try:
        stats = compact_index(index, settings, everything=not due_only)
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    if as_json:
        out.print_json(json.dumps({"ok": True, **stats.__dict__}))
    else:
        out.print(
            f"{stats.merges} merge(s): {stats.segments_before} -> {stats.segments_after} segments, "
            f"{stats.deleted_rows_dropped} deleted rows dropped; live version {stats.version}"
        )


@app.command()
def restore(
    index: IndexOpt,
    version: Annotated[int, typer.Option(help="the kept version to make live again (see INDEX/versions)")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Roll the index back to a kept older version.

    A new version equal to it becomes live (the versions after it stay on disk as long as versions are kept). For a live version whose
    files are damaged (`verify` names them), or an ingest to undo."""
    _setup(verbose)
    settings = _settings(config, as_json=as_json)
    from pipelines.maintenance import restore_index

    try:
        live = restore_index(index, version, settings)
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    if as_json:
        out.print_json(json.dumps({"ok": True, "restored": version, "version": live}))
    elif live == version:
        out.print(f"version {version} is already live: nothing changed")
    else:
        out.print(f"restored version {version}: live version {live}")


@app.command()
def migrate(index: IndexOpt, as_json: JsonOpt = False, config: ConfigOpt = None, verbose: VerboseOpt = False) -> None:
    """Rewrite an index of the old layout (a full copy per version) as segments now.

    The next write would do it anyway. Older versions stay readable until they are collected."""
    _setup(verbose)
    settings = _settings(config, as_json=as_json)
    from pipelines.maintenance import migrate_index

    try:
        version = migrate_index(index, settings)
    except Exception as exc:
        raise _fail(exc, as_json=as_json) from exc
    if as_json:
        out.print_json(json.dumps({"ok": True, "migrated": version is not None, "version": version}))
    else:
        out.print("already in the segment layout" if version is None else f"migrated: version {version} is live")


@app.command()
def schedule(
    source: Annotated[str, typer.Argument(help="folder or .jsonl file to ingest on each run")],
    index: IndexOpt,
    cron: Annotated[str | None, typer.Option(help="cron schedule in UTC, e.g. '0 3 * * *' (03:00 UTC); give exactly one of --cron and --interval")] = None,
    interval: Annotated[float | None, typer.Option(help="seconds between runs, at least 1 (instead of --cron: exactly one of them)")] = None,
    name: Annotated[str | None, typer.Option(help="deployment name (default: derived from the index path)")] = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a scheduled ingest deployment against a Prefect server (PREFECT_API_URL).

    Runs until interrupted. Start a server first: prefect server start."""
    _setup(verbose)
    if (cron is None) == (interval is None):
        raise typer.BadParameter("give exactly one of --cron or --interval")
    _check_cadence(cron, interval)
    from flows.dask_runner import torch_threads
    from flows.schedule import require_prefect_server, serve_ingest_deployment

    try:
        require_prefect_server()  # before the settings, the flows and the model are loaded
        torch_threads()  # read by each scheduled run's embedding tasks: refused now, not at every run
    except Exception as exc:
        raise _fail(exc) from exc
    settings = _settings(config, encoder_show_progress=False)
    try:
        serve_ingest_deployment(source, index, settings, cron=cron, interval=interval, name=name)
    except Exception as exc:
        raise _fail(exc) from exc


def _check_cadence(cron: str | None, interval: float | None) -> None:
    """A usage error for a cadence Prefect would refuse (its pydantic dump, exit 1, and only
    once a server answered) or take: --interval 0.001 was a schedule of a run a millisecond."""
    import math

    if interval is not None and not (math.isfinite(interval) and interval >= 1):
        raise typer.BadParameter(f"--interval is seconds between runs, at least 1, not {interval}")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError as exc:
            raise typer.BadParameter(f"--cron {cron!r} is not a cron schedule (minute hour day month weekday, "
                                     "in UTC, e.g. '0 3 * * *')") from exc


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo index is written")] = Path(".htp-demo"),
    question: Annotated[str, typer.Option(help="the sample query")] = "How do summary tokens let early words see later sentences?",
) -> None:
    """Ingest the bundled sample corpus with the default model, or the one htp-index.toml names, into a local index and query it."""
    import time

    began = time.perf_counter()
    _setup(False)
    from pipelines.sample_corpus import sample_dir

    index = workdir / "index"
    console.print(f"[bold]1/2[/bold] ingesting the bundled sample corpus ({escape(str(sample_dir()))}) into {escape(str(index))}")
    ingest(str(sample_dir()), index)
    console.print(f"[bold]2/2[/bold] query: {escape(repr(question))}")
    query(question, index, top_k=3)
    command = time.perf_counter() - began
    try:  # the process's age includes starting Python and importing, which users wait for too
        import psutil

        total = time.time() - psutil.Process().create_time()
        console.print(f"demo total wall time: {total:.1f} s ({command:.1f} s after start-up and imports)")
    except ImportError:  # pragma: no cover - psutil comes with prefect
        console.print(f"demo wall time after start-up and imports: {command:.1f} s")


def _register_eval() -> None:
    try:
        from htp_cli.eval_command import eval_command
    except ImportError:  # pragma: no cover - the evaluation extra is optional
        return
    app.command(name="eval", help=eval_command.__doc__)(eval_command)


_register_eval()


def _reflow_help(doc: str) -> str:
    """A command's docstring as its help: each paragraph on one line. Rich help keeps a
    docstring's line breaks as written, so the source's wrap at 100 columns broke lines again,
    mid-sentence, in an 80-column terminal."""
    import inspect

    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(doc).split("\n\n"))


for _command in app.registered_commands:
    _command.help = _reflow_help(_command.help or _command.callback.__doc__ or "")


if __name__ == "__main__":  # pragma: no cover
    app()
