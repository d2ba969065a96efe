"""How the command line reports an error: one line, and the exit code that says whose it is.

Exit 2 is bad usage: what was asked cannot be done as asked (an option, a setting, a filter,
a path with no index or an index folder a writer cannot write, options that conflict with the
index, a malformed evaluation dataset, a model that is neither packaged nor a readable model
folder, a moved model folder not named again, a model cache folder this user cannot write,
keyword search of an index without a keyword table, or reranking with a model that cannot),
so running it again unchanged fails again. Exit 1 is a run that failed (a damaged file, a busy
index, a crash of a library): the index is unchanged and a retry may succeed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

EXIT_FAILED = 1
EXIT_USAGE = 2  # typer's code for bad options too

console = Console(stderr=True)


def is_usage_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the request itself was wrong (exit 2) rather than the run (exit 1)."""
    from pydantic import ValidationError

    from htp_embed.config import EncoderSettingError
    from htp_embed.packaged_models import ModelNotAvailableError
    from indexes.errors import (
        EncoderMismatchError,
        IndexNotFoundError,
        IndexPathTooLongError,
        SparseIndexMissingError,
        UnsupportedFilterError,
        UnsupportedIndexKindError,
    )
    from pipelines.errors import DatasetError, IndexNotWritableError, OptionConflictError
    from pipelines.query import InvalidQueryError

    return isinstance(exc, OptionConflictError | InvalidQueryError | IndexNotFoundError | IndexPathTooLongError
                      | EncoderMismatchError
                      | UnsupportedFilterError | UnsupportedIndexKindError | EncoderSettingError
                      | ValidationError | DatasetError | ModelNotAvailableError | IndexNotWritableError
                      | SparseIndexMissingError) or _cannot_rerank(exc)


def _cannot_rerank(exc: BaseException) -> bool:
    """A model that cannot rerank (asking again fails again). Looked up where it was raised:
    importing the reranker imports torch, seconds on a keyword query's failure path."""
    rerank = sys.modules.get("htp_embed.rerank")
    return rerank is not None and isinstance(exc, rerank.RerankUnavailableError)


def describe(exc: BaseException) -> str:
    """``exc`` as one readable message: a pydantic error as ``field: problem`` pairs, without
    the echoed input and the documentation link it prints by default; a folder without an index
    with the command that creates one."""
    from pydantic import ValidationError

    from indexes.errors import IndexNotFoundError

    if isinstance(exc, IndexNotFoundError) and exc.nothing_there:
        # the Python API's wording named FaissVectorStore.create(...) first; query said this
        return f"no index at {exc.path}; create one with: htp-index ingest SOURCE --index {exc.path}"
    if isinstance(exc, ValidationError):
        problems = [f"{'.'.join(str(part) for part in error['loc']) or exc.title}: "
                    f"{error['msg'].removeprefix('Value error, ')}{_misplaced(error, exc.title)}"
                    for error in exc.errors()]
        return f"invalid {exc.title} setting: " + "; ".join(problems)
    return str(exc) or type(exc).__name__


def _misplaced(error: dict, model: str) -> str:
    """Where an encoder setting written at the settings' top level belongs ("method = ..." above
    any section: "Extra inputs are not permitted" alone did not say)."""
    from htp_embed import EncoderConfig

    loc = error.get("loc", ())
    if model == "Settings" and error.get("type") == "extra_forbidden" and len(loc) == 1 and loc[0] in EncoderConfig.model_fields:
        return f" ({loc[0]} is an encoder setting: put it under [encoder] in the settings file, or set HTP_INDEX_ENCODER__{str(loc[0]).upper()})"
    return ""


# Click's UsageError as this typer raises it (typer 0.29 carries its own copy of Click, whose
# exceptions are not the click package's)
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class JsonFailureGroup(TyperGroup):
    """The command group that keeps ``--json``'s promise for bad usage Click itself reports (an
    option out of range, a ``typer.BadParameter`` raised by a command): the help box went to
    stderr and stdout stayed empty, which a script parsing stdout could not read."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        given = args[: args.index("--")] if "--" in args else args
        ctx.meta["htp_index.json"] = "--json" in given
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as exc:
            if ctx.meta.get("htp_index.json"):
                print_json_failure(exc.format_message(), exc.exit_code)
            raise


def print_json_failure(error: str, code: int) -> None:
    """What ``--json`` prints on stdout for a command that fails: one object, the same shape
    whoever reports the failure."""
    typer.echo(json.dumps({"ok": False, "error": error, "exit_code": code}))


def fail(exc: BaseException, *, as_json: bool = False) -> typer.Exit:
    """Print ``exc`` and return the exit to raise: 2 for bad usage, else 1. With ``as_json`` a
    script reading stdout gets ``{"ok": false, "error": ..., "exit_code": ...}`` there too, not
    an empty stdout it cannot parse."""
    code = EXIT_USAGE if is_usage_error(exc) else EXIT_FAILED
    console.print(f"[red]error:[/red] {escape(describe(exc))}", highlight=False, soft_wrap=True)  # one line, pasteable
    if as_json:
        print_json_failure(describe(exc), code)
    return typer.Exit(code)
