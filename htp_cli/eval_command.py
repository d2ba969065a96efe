"""``htp-index eval``: retrieval quality on a BEIR-format dataset, of one encoder setting
(the research harness) or of the product itself (``--pipeline``).

Only the command function lives here; the application registers it
(``app.command("eval")(eval_command)``), which keeps this module free of the CLI's wiring.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from htp_embed.config import DEFAULT_MODEL, METHODS
from pipelines.evaluation import METRICS, REFERENCE_METHODS

ALL_METHODS = (*METHODS, *REFERENCE_METHODS)
JSON_KEYS = ("dataset", "split", "method", "model", *METRICS, "queries", "docs")


def _parse_exit(value: str | None) -> int | None | str:
    """'default' (per-model), 'full' / 'none' (all layers + final norm), or a layer number."""
    if value is None or value.lower() == "default":
        return "default"
    if value.lower() in ("full", "none"):
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise typer.BadParameter("use a layer number (e.g. -2), 'default' or 'full'") from exc


def _settings(
    method: str, model: str, k: str | None, rewire_start: int | None, rewire_stop: int | None,
    exit_layer: str | None, batch_size: int, max_length: int,
) -> dict[str, Any] | str:
    if method in REFERENCE_METHODS:
        return method
    return {
        "model": model, "method": method, "k": k or "adaptive", "rewire_start": rewire_start,
        "rewire_stop": rewire_stop, "exit_layer": _parse_exit(exit_layer),
        "batch_size": batch_size, "max_length": max_length,
    }


def eval_command(
    dataset_dir: Annotated[Path, typer.Argument(
        help="BEIR-format folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv",
        exists=True, file_okay=False)],
    split: Annotated[str, typer.Option(help="qrels split to score (qrels/<split>.tsv)")] = "train",
    method: Annotated[str, typer.Option(
        help=f"retriever: {', '.join(ALL_METHODS)} (bm25 and minilm are references)")] = "htp",
    model: Annotated[str, typer.Option(
        help="decoder: 'gemma3-270m', 'smollm2-135m', a local HF directory or a .gguf file")] = DEFAULT_MODEL,
    k: Annotated[str | None, typer.Option(
        help="HTP sentences per block: an integer, 'adaptive' or 'adaptive:MAX_BLOCKS' (default: adaptive)")] = None,
    rewire_start: Annotated[int | None, typer.Option(
        help="first rewired decoder layer, 0-based (default: per-model)")] = None,
    rewire_stop: Annotated[int | None, typer.Option(
        help="rewiring stops before this layer (default: per-model)")] = None,
    exit_layer: Annotated[str | None, typer.Option(
        help="layer whose output is pooled: -2 = second-to-last, 9 = 9th layer, "
             "'full' = all layers with the final norm, 'default' = per-model")] = "default",
    max_docs: Annotated[int | None, typer.Option(
        min=0, help="subsample: every judged document of the evaluated queries plus N others (fixed seed)")] = None,
    max_queries: Annotated[int | None, typer.Option(
        min=1, help="subsample: score N judged queries chosen with a fixed seed")] = None,
    seed: Annotated[int, typer.Option(help="seed of the subsample (with --max-docs or --max-queries)")] = 0,
    batch_size: Annotated[int, typer.Option(
        min=1, help="texts per forward pass of the HTP encoder (not with bm25, minilm or --pipeline, whose "
        "encoder takes the settings' batch_size)")] = 8,
    max_length: Annotated[int, typer.Option(min=8, help="tokens per text, placeholders included")] = 512,
    fuse_bm25: Annotated[bool, typer.Option(
        "--fuse-bm25", help="score the reciprocal-rank fusion (k=60) of BM25 and this method")] = False,
    pipeline: Annotated[bool, typer.Option(
        "--pipeline", help="measure the product itself: ingest the corpus into an index with the "
        "product's settings (htp-index.toml, HTP_INDEX_*; the encoder options above are refused) "
        "and query it through the retriever in --mode")] = False,
    mode: Annotated[str | None, typer.Option(
        help="with --pipeline: dense, sparse (BM25 keywords) or hybrid (default: the settings' "
        "query_mode, as `htp-index query` searches)")] = None,
    alpha: Annotated[float | None, typer.Option(
        min=0.0, max=1.0, help="with --pipeline and hybrid: weight of the dense side (default: tuned)")] = None,
    rerank: Annotated[bool | None, typer.Option(
        "--rerank/--no-rerank", help="with --pipeline: rerank each query's best hits (settings' "
        "rerank_depth) by the decoder's query likelihood; the rest of the list follows them "
        "(default: settings' rerank)")] = None,
    index_dir: Annotated[Path | None, typer.Option(
        help="with --pipeline: build (or reuse, incrementally) the index here instead of a temporary "
        "directory, so other modes can be scored without embedding again. It holds the dataset alone: "
        "documents of a later sample replace an earlier one's, and an index holding other documents "
        "(one of your own) is refused")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="with --pipeline: TOML settings file (default: ./htp-index.toml)")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="print one JSON object with the metrics (and \"ok\": true) on stdout, nothing else (with "
        "--pipeline also what made them: alpha, fusion, rerank, index kind, correction, splitting; and "
        "the dataset's notes: judgements or records dropped)")] = False,
    cache_dir: Annotated[Path | None, typer.Option(
        help="embedding cache (default: $HTP_INDEX_CACHE/eval or the user cache dir; not with bm25, "
        "which embeds nothing, or --pipeline)")] = None,
    keep_identical_ids: Annotated[bool, typer.Option(
        "--keep-identical-ids", help="score a query's hit on the document of its own id (BEIR leaves it out, "
        "as here by default: ArguAna and Quora hold each query in the corpus)")] = False,
) -> None:
    """Score a retriever on a BEIR dataset: NDCG@10, Recall@10/100, MRR@10 over all judgements.

    Document embeddings are cached, so re-running a setting costs only the search.
    """
    from htp_cli.failure import fail
    from pipelines.evaluation import evaluate

    # Options of the other path, or of an encoder a reference method does not use, are refused
    # rather than dropped without a word.
    encoder_options = {"--model": model != DEFAULT_MODEL, "--k": k is not None,
                       "--rewire-start": rewire_start is not None, "--rewire-stop": rewire_stop is not None,
                       "--exit-layer": exit_layer != "default", "--max-length": max_length != 512,
                       "--batch-size": batch_size != 8}
    if seed != 0 and max_docs is None and max_queries is None:
        raise typer.BadParameter("--seed chooses a subsample: it goes with --max-docs or --max-queries")
    if pipeline:
        not_here = {"--fuse-bm25": fuse_bm25, "--cache-dir": cache_dir is not None, "--method": method != "htp",
                    **encoder_options}
        where = "with --pipeline (its encoder is the settings' and the index's)"
    elif method in REFERENCE_METHODS:
        not_here = {"--mode": mode is not None, "--alpha": alpha is not None, "--rerank/--no-rerank": rerank is not None,
                    "--index-dir": index_dir is not None, "--config": config is not None,
                    "--fuse-bm25": fuse_bm25 and method == "bm25", "--cache-dir": cache_dir is not None and method == "bm25",
                    **encoder_options}
        where = f"to --method {method} (a reference retriever, not the HTP encoder)"
    else:
        not_here = {"--mode": mode is not None, "--alpha": alpha is not None, "--rerank/--no-rerank": rerank is not None,
                    "--index-dir": index_dir is not None, "--config": config is not None}
        where = "without --pipeline"
    ignored = [name for name, given in not_here.items() if given]
    if ignored:
        raise typer.BadParameter(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply {where}")
    if not pipeline and method in METHODS:  # --k with vanilla was scored as plain vanilla, exit 0
        from pipelines.engine import options_the_method_ignores

        refusal = options_the_method_ignores(method, [flag for flag in ("--k", "--rewire-start", "--rewire-stop")
                                                      if encoder_options[flag]])
        if refusal:
            raise typer.BadParameter(refusal)
    if pipeline:
        try:
            _run_pipeline(dataset_dir, split, mode, alpha, rerank, index_dir, config, max_docs, max_queries, seed,
                          json_output, not keep_identical_ids)
        except (typer.Exit, typer.BadParameter):
            raise
        except Exception as exc:
            raise fail(exc, as_json=json_output) from exc
        return
    if method not in ALL_METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = _settings(method, model, k, rewire_start, rewire_stop, exit_layer, batch_size, max_length)
    # Libraries that print would corrupt --json output: send their stdout to stderr.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            result = evaluate(
                dataset_dir, split, settings, max_docs=max_docs, max_queries=max_queries, seed=seed,
                cache_dir=cache_dir, fuse_bm25=fuse_bm25, ignore_identical_ids=not keep_identical_ids,
            )
    except Exception as exc:
        raise fail(exc, as_json=json_output) from exc
    if json_output:
        typer.echo(json.dumps({"ok": True, **{key: result[key] for key in JSON_KEYS}, "sample": result["sample"]}))
        return
    _print_table(result)


def _run_pipeline(
    dataset_dir: Path, split: str, mode: str | None, alpha: float | None, rerank: bool | None, index_dir: Path | None,
    config: Path | None, max_docs: int | None, max_queries: int | None, seed: int, json_output: bool,
    ignore_identical_ids: bool,
) -> None:
    from pipelines.eval_pipeline import evaluate_pipeline
    from pipelines.query import QUERY_MODES
    from pipelines.settings import load_settings

    if mode is not None and mode not in QUERY_MODES:
        raise typer.BadParameter(f"unknown mode {mode!r}; choose from {', '.join(QUERY_MODES)}")
    settings = load_settings(config)
    mode = mode or settings.query_mode  # scored "hybrid" where the product's queries search another
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_pipeline(
            dataset_dir, split, mode=mode, alpha=alpha, settings=settings, index_dir=index_dir,  # type: ignore[arg-type]
            max_docs=max_docs, max_queries=max_queries, seed=seed, rerank=rerank,
            ignore_identical_ids=ignore_identical_ids,
        )
    if json_output:
        # what made the figure, so that rows of several runs can be told apart
        made_by = {key: result["pipeline"][key] for key in
                   ("alpha", "fusion", "rerank", "index_kind", "correction", "splitting")}
        typer.echo(json.dumps({"ok": True, **{key: result[key] for key in JSON_KEYS}, "mode": mode, **made_by,
                               "sample": result["sample"]}))
        return
    _print_table(result)


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{result['dataset']} ({result['split']}): {result['describe']}"))
    for column in ("queries", "docs", *METRICS):
        table.add_column(column, justify="right")
    table.add_row(
        str(result["queries"]), str(result["docs"]),
        *(f"{100 * result[m]:.2f}" for m in METRICS),
    )
    console = Console()
    console.print(table)
    pipeline = result.get("pipeline")
    if pipeline is not None:
        correction = (pipeline["correction"] or {}).get("kind", "none")
        console.print(f"[dim]index: {pipeline['index_kind']}, correction {correction}, "
                      f"splitting {pipeline['splitting']}[/dim]")
    dropped = {key: value for key, value in result.get("sample", {}).items()
               if key in ("repeated_doc_ids", "repeated_query_ids", "repeated_judgements",
                          "dropped_judgements_missing_docs", "dropped_judged_queries_missing", "identical_ids_dropped")}
    if dropped:  # the figure is over what was left: say what was not
        console.print("[yellow]dataset: " + ", ".join(f"{key.replace('_', ' ')}: {value}"
                                                      for key, value in dropped.items()) + "[/yellow]")
    cache = result.get("cache")
    if cache is not None:
        console.print(f"[dim]cache: {cache['hits']} hit(s), {cache['misses']} miss(es) in {escape(str(cache['dir']))}; "
                      f"{result['seconds']} s[/dim]")
    else:
        console.print(f"[dim]{result['seconds']} s[/dim]")
