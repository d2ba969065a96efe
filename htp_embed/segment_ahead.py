"""Segment texts known in advance in a side process, while this one loads the model.

A cold ``htp-index query`` knows its one text before anything is loaded, yet its sentences
come from spaCy, whose import and ``senter`` model cost ~0.7 s of a ~4 s start. Loaded in a
thread (:func:`htp_embed.segment.preload_segmenter`) that time is not saved: importing torch,
reading ``tokenizer.json`` and importing spaCy all hold the GIL. A second process has its own
interpreter, so on a machine with two cores spaCy loads *beside* torch and the tokenizer
instead of between them. :func:`segment_ahead` starts that process for the given texts;
:func:`htp_embed.segment.sentence_starts` takes its answers for exactly those texts and that
segmenter, and segments anything else (or everything, should the side process fail) in this
process as before. The side process runs this module's ``_main`` with the same interpreter
and code, so its answers are those :func:`~htp_embed.segment.sentence_starts` gives here.
A cold query on 2 Zen 4 cores: 4.15 -> 3.35 s median (benchmarks/results/query_startup.md).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

# How long a first text waits for the side process before segmenting in this process instead.
WAIT_S = 60.0


class _SideProcess:
    """One side process: its texts, and its answer once the reader thread has it."""

    def __init__(self, texts: list[str], kind: str):
        self.texts = texts
        self.kind = kind
        self.answer: list[list[int]] | None = None
        # This very code, even where this process found it by a path of its own (a test's
        # rootdir): appended, so it never shadows the standard library.
        root = str(Path(__file__).resolve().parents[1])
        program = (f"import sys; {root!r} in sys.path or sys.path.append({root!r}); "
                   f"from htp_embed.segment_ahead import _main; _main({kind!r})")
        self.process = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        # communicate() writes and reads in a thread of its own, so a payload larger than the
        # pipe's buffer never blocks this process while the side process is still importing.
        self.reader = threading.Thread(target=self._read, name="htp-segment-ahead", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # any failure: the texts are segmented here instead
            out, _ = self.process.communicate(json.dumps(self.texts).encode())
            answer = json.loads(out) if self.process.returncode == 0 else None
            if isinstance(answer, list) and len(answer) == len(self.texts):
                self.answer = answer

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


_LOCK = threading.Lock()
_PENDING: dict[str, _SideProcess] = {}


def segment_ahead(texts: Sequence[str], kind: str = "senter") -> None:
    """Start segmenting ``texts`` with segmenter ``kind`` in a side process (see the module);
    on a single core it would only add its own start-up, so there the texts wait for this one."""
    if _usable_cores() < 2:
        return
    try:
        side = _SideProcess(list(texts), kind)
    except OSError as exc:  # no interpreter to start (a frozen app): segment here, as before
        log.debug("no side process for segmentation: %s", exc)
        return
    with _LOCK:
        previous = _PENDING.pop(kind, None)
        _PENDING[kind] = side
    if previous is not None:
        previous.stop()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pending(kind: str) -> bool:
    """Whether a side process was started for segmenter ``kind`` and not yet consumed."""
    return kind in _PENDING


def answers_for(texts: Sequence[str], kind: str) -> list[list[int]] | None:
    """The side process's sentence starts for ``texts``, if it was asked exactly these texts
    with this segmenter and answered; ``None`` means: segment them here. Consumes the answer."""
    with _LOCK:
        side = _PENDING.get(kind)
        if side is None or side.texts != list(texts):
            return None
        del _PENDING[kind]
    side.reader.join(WAIT_S)
    side.stop()
    if side.answer is None:
        log.debug("side segmentation gave no answer; segmenting in this process")
    return side.answer


def _main(kind: str) -> None:
    # thinc imports torch when it can (1-1.5 s, twice the rest of this process's work); the
    # sentence recogniser runs on numpy, and its answers do not depend on it
    # (tests/test_segment_ahead.py compares them with this process's).
    sys.modules["torch"] = None  # type: ignore[assignment]
    from htp_embed.segment import sentence_starts

    texts = json.loads(sys.stdin.buffer.read())
    sys.stdout.write(json.dumps(sentence_starts(texts, kind)))  # type: ignore[arg-type]

