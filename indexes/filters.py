"""LlamaIndex ``MetadataFilters`` compiled to a SQLite condition over the docstore's metadata.

The store runs the condition to get the allowed FAISS ids, which then go *inside* the search as
an ``IDSelector`` (see `vectors`), so filtering never depends on over-fetching.

Semantics follow LlamaIndex's reference implementation (``build_metadata_filter_fn``):

* a missing or null key matches only ``NE`` and ``NIN``;
* ``EQ``/``NE``/``IN``/``NIN`` compare numbers with numbers (1 == 1.0, booleans count as 0/1)
  and strings with strings; ``NE`` and ``NIN`` are the exact negations of ``EQ`` and ``IN``;
* ``LT``/``LTE``/``GT``/``GTE`` compare numbers numerically and strings by code point; a type
  mismatch (where Python would raise) simply does not match;
* list or object metadata values never equal a scalar;
* ``CONTAINS`` matches a list value holding the scalar (same type rules as ``EQ``), ``ANY``
  one holding at least one of a list of scalars, ``ALL`` one holding every one of them (lists
  such as a JSONL record's ``tags``);
* conditions ``AND`` and ``OR`` nest up to `MAX_DEPTH` groups deep; ``NOT`` matches when no
  sub-filter matches. A group of many conditions is any length: its SQL is a balanced tree
  (SQLite refuses an expression over 1,000 levels deep, as a flat chain of 999 ORs was).

Operators outside that set (``TEXT_MATCH``, ``IS_EMPTY``…), groups nested deeper than SQLite's
parser goes, integers outside SQLite's 64 bits and filters binding more values than a SQLite
statement takes raise `UnsupportedFilterError` (a usage error: the service's 422), rather than
being silently ignored or failing inside SQLite as if the index were damaged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from .errors import UnsupportedFilterError

SUPPORTED_OPERATORS = frozenset(
    {
        FilterOperator.EQ,
        FilterOperator.NE,
        FilterOperator.IN,
        FilterOperator.NIN,
        FilterOperator.LT,
        FilterOperator.LTE,
        FilterOperator.GT,
        FilterOperator.GTE,
        FilterOperator.CONTAINS,
        FilterOperator.ANY,
        FilterOperator.ALL,
    }
)
_COMPARE = {
    FilterOperator.LT: "<",
    FilterOperator.LTE: "<=",
    FilterOperator.GT: ">",
    FilterOperator.GTE: ">=",
}
#: Groups nested deeper than this are refused: SQLite's parser overflows its stack near 99.
MAX_DEPTH = 32
#: Values a compiled filter may bind (SQLite's limit is 32,766; each condition binds 3).
MAX_PARAMS = 30_000
_INT64 = (-(2**63), 2**63 - 1)
_NUMERIC_TYPES = "('integer','real','true','false')"
_SCALAR_TYPES = "('integer','real','text','true','false')"


def compile_filters(filters: MetadataFilters, column: str = "metadata") -> tuple[str, list[Any]]:
    """SQL boolean expression (never NULL) and its parameters for `filters`."""
    require_metadata_filters(filters)
    params: list[Any] = []
    sql = _group(filters, column, params, depth=1)
    if len(params) > MAX_PARAMS:
        raise UnsupportedFilterError(
            f"the filter has {len(params) // 3:,} conditions, more than one query can bind "
            f"(~{MAX_PARAMS // 3:,}); put many values of one key into a single IN condition")
    return sql, params


def require_metadata_filters(filters: object) -> None:
    """Refuse, by name, filters that are not LlamaIndex's ``MetadataFilters`` (a dict failed
    deep in the search with "'dict' object has no attribute 'filters'")."""
    if not isinstance(filters, MetadataFilters):
        raise UnsupportedFilterError(
            f"filters must be LlamaIndex MetadataFilters, e.g. MetadataFilters(filters=[MetadataFilter("
            f"key='file_type', value='md')]), not a {type(filters).__name__}")


def filters_key(where: str, params: Sequence[Any]) -> str:
    """A key for the id set a compiled filter selects: its SQL and the exact values bound to it.
    (The filter's JSON wrote inf, -inf and NaN all as null, so ``x < -inf`` was answered from
    ``x < inf``'s kept ids, and ``delete_nodes`` with it deleted every row.)"""
    return repr((where, [(type(value).__name__, repr(value)) for value in params]))


def _group(filters: MetadataFilters, column: str, params: list[Any], depth: int) -> str:
    if depth > MAX_DEPTH:
        raise UnsupportedFilterError(
            f"filter groups nest more than {MAX_DEPTH} deep; flatten them (a group holds any number of conditions)")
    condition = filters.condition or FilterCondition.AND
    parts = []
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            parts.append(_group(item, column, params, depth + 1))
        else:
            parts.append(_leaf(item, column, params))
    if not parts:
        return "1"
    if condition == FilterCondition.AND:
        return _balanced(" AND ", parts)
    if condition == FilterCondition.OR:
        return _balanced(" OR ", parts)
    if condition == FilterCondition.NOT:
        return "(NOT " + _balanced(" OR ", parts) + ")"
    raise UnsupportedFilterError(f"filter condition {condition!r} is not supported")


def _balanced(join: str, parts: Sequence[str]) -> str:
    """``parts`` joined by ``join`` as a balanced tree of parentheses: the same condition, at a
    depth that grows with the log of their number (a flat chain of n is n levels deep to SQLite)."""
    if len(parts) == 1:
        return "(" + parts[0] + ")"
    if len(parts) <= 8:
        return "(" + join.join(parts) + ")"
    middle = len(parts) // 2
    return "(" + _balanced(join, parts[:middle]) + join + _balanced(join, parts[middle:]) + ")"


def _bound(key: str, value: Any) -> Any:
    """A scalar to bind: Python's integers are unbounded, SQLite's are 64 bits."""
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        raise UnsupportedFilterError(
            f"the value {value} on key {key!r} is outside the 64-bit integers metadata holds; "
            "compare with a float to mean a number that large")
    return value


def _path(key: str) -> str:
    """The JSON path of a top-level metadata key.

    The key goes in as JSON writes it (the docstore's ``json.dumps(..., ensure_ascii=False)``):
    SQLite before 3.45 compares a path's label with a key's escaped text as stored, and 3.45 on
    unescapes both, so the escaped form finds ``a\\b``, a tab or a newline in a key on either.
    Written raw, such a key never matched: ``==`` found nothing and ``!=`` every row.
    """
    if '"' in key:
        raise UnsupportedFilterError(f"metadata key {key!r} contains a double quote")
    return '$."' + json.dumps(key, ensure_ascii=False)[1:-1] + '"'


def _leaf(f: MetadataFilter, column: str, params: list[Any]) -> str:
    op = f.operator
    if op not in SUPPORTED_OPERATORS:
        raise UnsupportedFilterError(
            f"filter operator {op.name} ({op.value!r}) on key {f.key!r} is not supported; "
            f"use one of {', '.join(sorted(o.name for o in SUPPORTED_OPERATORS))}"
        )
    if op in (FilterOperator.NE, FilterOperator.NIN):
        positive = FilterOperator.EQ if op == FilterOperator.NE else FilterOperator.IN
        return "(NOT " + _positive(f.key, positive, f.value, column, params) + ")"
    return _positive(f.key, op, f.value, column, params)


def _positive(key: str, op: FilterOperator, value: Any, column: str, params: list[Any]) -> str:
    path = _path(key)
    if op in (FilterOperator.ANY, FilterOperator.ALL):
        if not isinstance(value, list) or not value:
            raise UnsupportedFilterError(f"{op.name} on key {key!r} needs a non-empty list of values")
        join = " OR " if op == FilterOperator.ANY else " AND "
        return _balanced(join, [_contains(key, item, column, params) for item in value])
    if op == FilterOperator.CONTAINS:
        return _contains(key, value, column, params)
    value_sql = f"json_extract({column}, ?)"
    type_sql = f"json_type({column}, ?)"
    if op in (FilterOperator.IN, FilterOperator.NIN):
        if not isinstance(value, list):
            raise UnsupportedFilterError(f"{op.name} on key {key!r} needs a list value")
        params.extend([path, path, json.dumps(value)])
        return (
            f"coalesce(({type_sql} IN {_SCALAR_TYPES} AND "
            f"{value_sql} IN (SELECT value FROM json_each(?))), 0)"
        )
    if isinstance(value, list):
        raise UnsupportedFilterError(
            f"{op.name} on key {key!r} compares with one value; use IN/NIN for a list"
        )
    if value is None:
        return "0"  # a null value equals and orders against nothing (NE/NIN negate this)
    guard = "= 'text'" if isinstance(value, str) else f"IN {_NUMERIC_TYPES}"
    sql_op = "=" if op == FilterOperator.EQ else _COMPARE[op]
    params.extend([path, path, _bound(key, value)])
    return f"coalesce(({type_sql} {guard} AND {value_sql} {sql_op} ?), 0)"


def _contains(key: str, value: Any, column: str, params: list[Any]) -> str:
    """The key's value is a list holding ``value`` (strings match strings, numbers numbers)."""
    if isinstance(value, list | dict) or value is None:
        raise UnsupportedFilterError(f"CONTAINS on key {key!r} looks for one text or number")
    guard = "= 'text'" if isinstance(value, str) else f"IN {_NUMERIC_TYPES}"
    params.extend([_path(key), _path(key), _bound(key, value)])
    return (f"coalesce((json_type({column}, ?) = 'array' AND EXISTS (SELECT 1 FROM "
            f"json_each({column}, ?) AS item WHERE item.type {guard} AND item.value = ?)), 0)")
