"""A cold query's text work, done in a side process while this one loads the model.

A cold ``htp-index query`` knows its text before anything is loaded, yet two things it needs
from that text cost ~1.7 s of a 3-4 s start: the packaged model's tokenizer (``tokenizer.json``,
262k tokens and 515k merges: ~1 s to read) and spaCy's sentences (its import and ``senter``:
~0.7 s). In this process both would queue behind torch's import, since reading the tokenizer,
importing torch and importing spaCy all hold the GIL (a thread saves nothing). A second
process has its own interpreter, so on two cores they run *beside* the import instead.

:func:`prepare_query` starts those processes for a query's texts under an encoder's settings,
one per part, since each part alone takes about as long as this process needs before it asks:
one tokenizes what :class:`~htp_embed.encoder.HTPEncoder` will ask of the tokenizer (the texts,
the query instruction, the template probe) with the tokenizer class this process uses, the
other segments the texts. This process takes those answers only for exactly what was asked: the
same tokenizer directory (:meth:`~htp_embed.packaged_tokenizer.PackagedTokenizer.from_dir`
reads ``tokenizer.json`` only for a call it was not answered), the same texts, flags and
segmenter (:func:`htp_embed.segment.sentence_starts`). Anything else, and everything should
the side process fail, is done here as before. The side process runs this module's ``_main``
with the same interpreter and code, so its answers are those this process would compute.
A cold query on 2 Zen 4 cores: 4.15 -> 3.35 s median with the sentences alone
(benchmarks/results/query_startup.md); the tokenizer's answers too, on 2 cores of an Intel
Xeon: 2.93 -> 2.43 s (query_startup_intel_xeon.md).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from htp_embed.config import EncoderConfig

log = logging.getLogger(__name__)

# How long a first use waits for the side process before doing the work in this process instead.
WAIT_S = 60.0
# The text special_token_template (htp_embed.encoder) tokenizes with and without the template.
TEMPLATE_PROBE = "x"


@dataclass(frozen=True)
class TokenCall:
    """One text as a tokenizer call would encode it (offsets are always computed)."""

    text: str
    add_special_tokens: bool
    split_special_tokens: bool


class _SideProcess:
    """One side process: its request, and its answer once the reader thread has it."""

    def __init__(self, part: str, request: dict[str, Any]):
        self.part = part
        self.request = request
        self.answer: Any = None
        # This very code, even where this process found it by a path of its own (a test's
        # rootdir): appended, so it never shadows the standard library.
        root = str(Path(__file__).resolve().parents[1])
        program = (f"import sys; {root!r} in sys.path or sys.path.append({root!r}); "
                   f"from htp_embed.text_ahead import _main; _main({part!r})")
        self.process = subprocess.Popen([sys.executable, "-c", program], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        atexit.register(self.stop)
        # communicate() writes and reads in a thread of its own, so a payload larger than the
        # pipe's buffer never blocks this process while the side process is still importing.
        self.reader = threading.Thread(target=self._read, args=(json.dumps(request).encode(),),
                                       name=f"htp-{part}-ahead", daemon=True)
        self.reader.start()

    def _read(self, request: bytes) -> None:
        with contextlib.suppress(Exception):  # any failure: the work is done here instead
            out, _ = self.process.communicate(request)
            if self.process.returncode == 0:
                self.answer = json.loads(out)

    def result(self) -> Any:
        """The answer (``None``: none came), waiting for the process at most WAIT_S."""
        self.reader.join(WAIT_S)
        self.stop()
        if self.answer is None:
            log.debug("the side process gave no %s; computing them in this process", self.part)
        return self.answer

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


class PendingTokens:
    """A side process's tokenizer answers for one directory, waited for on first use."""

    def __init__(self, side: _SideProcess):
        self._side = side

    def result(self) -> dict[str, Any] | None:
        """``{"special_ids": {...}, "encodings": [[text, add, split, ids, mask, offsets], ...]}``
        as :meth:`PackagedTokenizer.answers` wrote it, or ``None`` (the caller keeps it)."""
        found = self._side.result()
        return found if isinstance(found, dict) else None


_LOCK = threading.Lock()
_PENDING: dict[str, _SideProcess] = {}  # by part ("tokens", "sentences"): started, not yet taken


def start(texts: Sequence[str], *, segmenter: str | None = None, tokenizer: Path | None = None,
          token_calls: Sequence[TokenCall] = ()) -> None:
    """Start side processes: one that tokenizes ``token_calls`` with the packaged tokenizer in
    ``tokenizer`` (a directory; ``None``: no tokens), one that segments ``texts`` with
    ``segmenter`` (``None``: no sentences). Two processes, not one: each part alone takes about
    as long as this process needs before it asks for either. On a single core they would only
    add their own start-up, so there everything waits for this process."""
    if _usable_cores() < 2:
        return
    requests = {}
    if tokenizer is not None:
        requests["tokens"] = {"tokenizer": str(tokenizer),
                              "calls": [[c.text, c.add_special_tokens, c.split_special_tokens] for c in token_calls]}
    if segmenter is not None:
        requests["sentences"] = {"texts": list(texts), "segmenter": segmenter}
    for part, request in requests.items():
        try:
            side = _SideProcess(part, request)
        except OSError as exc:  # no interpreter to start (a frozen app): work here, as before
            log.debug("no side process for the query's %s: %s", part, exc)
            return
        with _LOCK:
            previous = _PENDING.pop(part, None)
            _PENDING[part] = side
        if previous is not None:
            previous.stop()


def prepare_query(config: EncoderConfig, texts: Sequence[str]) -> None:
    """Start the side process for what embedding ``texts`` as queries with ``config`` needs
    from the texts alone: its packaged tokenizer's answers (a user's model directory is read by
    transformers in this process) and, for a method that lays texts out by sentence, their
    sentences."""
    from htp_embed.methods import method_for
    from htp_embed.packaged_models import PACKAGED_MODELS, tokenizer_dir

    texts = list(texts)
    tokenizer = None
    if config.model in PACKAGED_MODELS:
        candidate = tokenizer_dir(config.model, config.cache_dir)
        tokenizer = candidate if (candidate / "tokenizer.json").is_file() else None  # not converted yet
    segmenter = config.segmenter if method_for(config.method).needs_sentences else None
    start(texts, segmenter=segmenter, tokenizer=tokenizer, token_calls=query_token_calls(config, texts))


def query_token_calls(config: EncoderConfig, texts: Sequence[str]) -> list[TokenCall]:
    """What :class:`~htp_embed.encoder.HTPEncoder` asks its tokenizer while it loads and embeds
    ``texts`` as queries: the template probe with and without the template, the instruction,
    and each text (a call this misses is computed in this process: slower, never different)."""
    calls = [TokenCall(TEMPLATE_PROBE, False, False), TokenCall(TEMPLATE_PROBE, True, False)]
    if config.query_instruction:
        calls.append(TokenCall(config.query_instruction, False, True))
    calls += [TokenCall(text, False, True) for text in texts]
    return calls


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _claim(part: str, matches: Callable[[dict[str, Any]], bool]) -> _SideProcess | None:
    """The pending side process of ``part``, if its request ``matches``; taken (once)."""
    with _LOCK:
        side = _PENDING.get(part)
        if side is None or not matches(side.request):
            return None
        del _PENDING[part]
        return side


def segmenting(kind: str) -> bool:
    """Whether a side process is segmenting with ``kind`` and nobody has taken its sentences."""
    with _LOCK:
        side = _PENDING.get("sentences")
        return side is not None and side.request["segmenter"] == kind


def sentences_for(texts: Sequence[str], kind: str) -> list[list[int]] | None:
    """The side process's sentence starts for ``texts``, if it was asked exactly these texts
    with this segmenter and answered; ``None`` means: segment them here. Consumes the answer."""
    side = _claim("sentences", lambda asked: asked["segmenter"] == kind and asked["texts"] == list(texts))
    if side is None:
        return None
    found = side.result()
    return found if isinstance(found, list) and len(found) == len(side.request["texts"]) else None


def tokens_for(directory: Path) -> PendingTokens | None:
    """The side process's tokenizer answers for the tokenizer in ``directory``, if it was asked
    to read that one (waited for on first use, see :class:`PendingTokens`). Consumes them."""
    side = _claim("tokens", lambda asked: asked["tokenizer"] == str(directory))
    return PendingTokens(side) if side is not None else None


def _main(part: str) -> None:
    # thinc imports torch when it can (1-1.5 s, more than the rest of this process's work); the
    # sentence recogniser runs on numpy, and neither its answers nor the tokenizer's depend on it
    # (tests/test_text_ahead.py compares them with this process's).
    sys.modules["torch"] = None  # type: ignore[assignment]
    request = json.loads(sys.stdin.buffer.read())
    if part == "tokens":
        from htp_embed.packaged_tokenizer import PackagedTokenizer

        calls = [TokenCall(text, bool(add), bool(split)) for text, add, split in request["calls"]]
        answer: Any = PackagedTokenizer.from_dir(Path(request["tokenizer"])).answers(calls)
    else:
        from htp_embed.segment import sentence_starts

        answer = sentence_starts(request["texts"], request["segmenter"])
    sys.stdout.write(json.dumps(answer))
