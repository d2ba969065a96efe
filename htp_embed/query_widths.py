"""Queries padded to a few widths on the CPU, so that a long-running process compiles a few
kernels for them rather than one per query length.

Why: oneDNN compiles a matrix kernel for every new input shape, and it and ideep each keep up
to 1,024 of them (~0.7 MiB each). A query's pass has as many rows as the query has positions,
so every new query length cost its first query ~7 ms and the process ~3 MiB for good: 300
SciFact claims and then 300 queries of 300 distinct lengths grew a process by 1,085 MiB (Intel
Xeon with AMX, bfloat16; ``benchmarks/results/query_widths.md``), which is what a query service
sees over its uptime. Padded to the widths below: by 266 MiB, the long queries' p50 63 ms
against 80 (no compiling), the claims' p95 27-29 ms against 28-44.

The price is padding: a query pass over a few dozen positions costs mostly streaming the
weights, so a few more rows cost little (0.7% a query once every width is compiled, at steps
of 4; 2% at steps of 8). Padding is masked out of attention and pooling; vectors move as
little as between two batch compositions (cosine >= 0.99998 to the exact width).

Only query batches of a few texts are padded: a big batch (pseudo-queries at ingest) has a
varying number of rows anyway and pays for padding in arithmetic; documents are left exact for
the same reason. Off the CPU nothing is padded.
"""

from __future__ import annotations

#: Widths (positions after a cached prefix) up to this are padded to a multiple of ``SHORT_STEP``.
SHORT_WIDTH = 64
SHORT_STEP = 4
#: Beyond ``SHORT_WIDTH``: this many widths per doubling (padding at most ~11% of a width).
STEPS_PER_OCTAVE = 8
#: Query batches of at most this many texts are padded to a bucket's width.
MAX_TEXTS = 4
#: Off (exact widths) for side-by-side measurement; tests and benchmarks switch it.
ENABLED = True


def bucketed_width(width: int) -> int:
    """The width a query batch of ``width`` positions is padded to (never less than ``width``)."""
    if width <= SHORT_WIDTH:
        step = SHORT_STEP
    else:
        step = max(SHORT_STEP, (1 << ((width - 1).bit_length() - 1)) // STEPS_PER_OCTAVE)
    return -(-width // step) * step


def padded_width(width: int, texts: int, *, is_query: bool, on_cpu: bool) -> int:
    """The width a batch of ``texts`` texts, the longest ``width`` positions, is laid out at."""
    if ENABLED and is_query and on_cpu and texts <= MAX_TEXTS:
        return bucketed_width(width)
    return width


def bucket_widths(up_to: int) -> list[int]:
    """Every bucket width from the smallest to the one holding ``up_to``."""
    widths: list[int] = []
    width = 1
    while not widths or widths[-1] < up_to:
        widths.append(bucketed_width(width))
        width = widths[-1] + 1
    return widths
