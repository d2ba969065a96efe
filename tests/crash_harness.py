"""Kill -9 an ingest or a rebuild at chosen points and check what survives.

Used by ``tests/test_crash_safety.py`` (a handful of points in CI) and by
``benchmarks/crash_campaign.py`` (the full campaign). Jobs run in child processes forked from a
``forkserver`` that has already imported torch, transformers, FAISS and the pipeline, so a job
starts in milliseconds and a kill lands in the job's own work, not in Python's imports.

Two kinds of kill point:

* **site** points: the child counts its calls to the functions that write an index version
  (``tempfile.mkdtemp``, ``faiss.write_index``, ``os.fsync``, ``os.rename``, ``os.replace``,
  ``shutil.rmtree``) and sends itself SIGKILL just before or just after call *n*. Enumerating
  every *n* covers every step of a commit deterministically. The child first writes the call
  it dies at into a marker file, so a test can check the kill landed where it meant.
* **time** points: the parent sends SIGKILL after a random delay in [0, the job's uninterrupted
  duration], which lands anywhere (reading, splitting, embedding, writing). A job that
  finishes before its kill tried no crash: the trial says so (``landed``) and checks nothing,
  and :func:`killed_at_a_random_time` draws again.

After each kill the index must open at a complete version: the one before the job or the one
the job would have produced. A re-run must then converge to the uninterrupted result: the same
node ids, the same vectors, the same count.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PRELOAD = ["torch", "transformers", "faiss", "spacy", "llama_index.core", "pipelines.ingest", "pipelines.rebuild"]
KILL_SITES = ("tempfile.mkdtemp", "faiss.write_index", "os.fsync", "os.rename", "os.replace", "shutil.rmtree")

_CONTEXT: Any = None


def context() -> Any:
    """The forkserver context, started once per process with the heavy modules imported."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


# ------------------------------------------------------------------ the job, in the child


@dataclass(frozen=True)
class Job:
    """One ingest or rebuild run, described with plain values so it crosses process lines."""

    kind: str  # "ingest", "rebuild" or "compact"
    index: str
    model: str
    source: str | None = None
    kill_call: int | None = None  # SIGKILL at this call of a KILL_SITES function ...
    kill_after: bool = False  # ... just after it returns instead of just before
    calls_file: str | None = None  # write the KILL_SITES calls made, in order, here (JSON)
    kill_marker: str | None = None  # the armed kill point writes "call site before|after" here


def _install_kill_points(job: Job) -> list[str]:
    import faiss

    calls: list[str] = []

    def wrap(module: Any, name: str) -> None:
        real = getattr(module, name)
        site = f"{module.__name__}.{name}"

        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(site)
            hit = len(calls) == job.kill_call
            if hit and not job.kill_after:
                _kill_self(job, len(calls), site, "before")
            result = real(*args, **kwargs)
            if hit:
                _kill_self(job, len(calls), site, "after")
            return result

        setattr(module, name, counted)

    for site in KILL_SITES:
        module_name, name = site.split(".")
        wrap({"tempfile": tempfile, "faiss": faiss, "os": os, "shutil": shutil}[module_name], name)
    return calls


def _kill_self(job: Job, call: int, site: str, when: str) -> None:
    """SIGKILL this process, first saying where (so the parent can check the kill landed at the
    point it meant: a shifted call count would otherwise kill somewhere else without a word)."""
    if job.kill_marker:
        with open(job.kill_marker, "w", encoding="utf-8") as marker:  # open() is no kill site
            marker.write(f"{call} {site} {when}")
    os.kill(os.getpid(), signal.SIGKILL)


def job_settings(model: str) -> Any:
    from htp_embed import EncoderConfig
    from pipelines.settings import Settings

    encoder = EncoderConfig(model=model, segmenter="sentencizer", show_progress=False, batch_size=8)
    return Settings(encoder=encoder, chunk_size=64, chunk_overlap=0, nodes_per_batch=16, lock_timeout=30)


def run_job(job: Job) -> None:
    """The child's body: one ingest or rebuild, with the kill points armed."""
    import torch

    torch.set_num_threads(1)  # identical arithmetic in every run, so vectors compare exactly
    calls = _install_kill_points(job)
    from pipelines.ingest import ingest
    from pipelines.rebuild import rebuild

    settings = job_settings(job.model)
    if job.kind == "ingest":
        ingest(job.source, job.index, settings)
    elif job.kind == "rebuild":
        rebuild(job.index, settings, encoder_overrides={"method": "vanilla"}, index_kind="hnsw")
    elif job.kind == "compact":
        from pipelines.maintenance import compact_index

        compact_index(Path(job.index), settings.model_copy(update={"lock_timeout": 30}))
    else:
        raise ValueError(job.kind)
    if job.calls_file:
        Path(job.calls_file).write_text(json.dumps(calls))


def run(job: Job, kill_after_seconds: float | None = None, timeout: float = 300) -> tuple[int | None, float]:
    """Run ``job`` in a forked child; returns its exit code (-9 when killed) and its duration."""
    process = context().Process(target=run_job, args=(job,))
    began = time.perf_counter()
    process.start()
    if kill_after_seconds is not None:
        process.join(kill_after_seconds)
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
    process.join(timeout)
    if process.is_alive():
        process.kill()
        raise TimeoutError(f"{job.kind} did not finish in {timeout} s")
    return process.exitcode, time.perf_counter() - began


# ------------------------------------------------------------------ checking, in the parent


@dataclass(frozen=True)
class Snapshot:
    """What an index serves: its version, encoder, and every node's vector."""

    version: int
    method: str
    index_kind: str
    vectors: dict[str, np.ndarray]
    doc_hashes: dict[str, str]
    keyword_rows: int | None

    def same_content(self, other: Snapshot, atol: float = 1e-5) -> bool:
        """Same encoder, kind, documents, node ids and vectors (the version number may differ),
        and a keyword index in step with the nodes."""
        return (
            self.keyword_rows == len(self.vectors)
            and self.method == other.method
            and self.index_kind == other.index_kind
            and self.doc_hashes == other.doc_hashes
            and self.vectors.keys() == other.vectors.keys()
            and all(np.allclose(self.vectors[k], other.vectors[k], atol=atol) for k in self.vectors)
        )


def snapshot(index: str | Path) -> Snapshot:
    """Open the live version exactly as a reader would (checksums verified) and read it all."""
    from indexes import FaissVectorStore

    store = FaissVectorStore.open(index, use_gpu=False)
    return Snapshot(
        version=store.version,
        method=store.encoder["method"],
        index_kind=store.index_kind,
        vectors={node_id: vector.copy() for node_id, vector in store.iter_embeddings()},
        doc_hashes=store.doc_hashes(),
        keyword_rows=store.keyword_rows(),
    )


def leftovers(index: str | Path) -> list[str]:
    """What a crash left behind: staging folders, versions not named by CURRENT, and segments,
    tombstone and docs files no version on disk names."""
    from indexes import persist

    root = Path(index)
    live = persist.current_version(root)
    names = []
    for entry in (root / persist.VERSIONS_DIR).iterdir():
        if entry.name.startswith(persist.TMP_PREFIX):
            names.append(entry.name)
    newer = [v for v in persist.list_versions(root) if live is not None and v > live]
    names += [persist.version_name(v) for v in newer]
    named_segments: set[str] = set()
    named_files: set[str] = set()
    for version in persist.list_versions(root):
        manifest = persist.read_manifest(root, version)
        named_segments.update(s.name for s in manifest.segments)
        named_files.update(s.deletes.path for s in manifest.segments if s.deletes is not None)
        named_files.update(d.path for d in manifest.docs)
    segments = root / "segments"
    for folder in sorted(segments.iterdir()) if segments.is_dir() else []:
        if folder.name not in named_segments:
            names.append(f"segments/{folder.name}")
        else:
            names += [f"segments/{folder.name}/{p.name}" for p in folder.glob("*del-*")
                      if f"segments/{folder.name}/{p.name}" not in named_files]
    docs = root / "docs"
    names += [f"docs/{p.name}" for p in (docs.iterdir() if docs.is_dir() else []) if f"docs/{p.name}" not in named_files]
    return names


# ------------------------------------------------------------------ a scenario


def write_corpus(folder: Path, n_docs: int, seed: int) -> Path:
    """A folder of documents in the tiny model's vocabulary (several nodes each)."""
    from pipeline_helpers import long_doc

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (folder / f"doc{i:03d}.txt").write_text(long_doc(6 + i % 7, seed=seed + i), encoding="utf-8")
    return folder


@dataclass
class Scenario:
    """An index at a known first version, and the job to interrupt: an ingest that adds,
    changes and deletes documents, or a rebuild to another method and index kind."""

    root: Path
    model: str
    kind: str
    before: Snapshot | None = None
    after: Snapshot | None = None  # the uninterrupted job's result
    duration: float = 0.0
    calls: list[str] | None = None  # the kill sites the uninterrupted job passes, in order

    @property
    def first_source(self) -> Path:
        return self.root / "src-v1"

    @property
    def second_source(self) -> Path:
        return self.root / "src-v2"

    @property
    def base(self) -> Path:
        return self.root / "base-index"

    def prepare(self) -> Scenario:
        """Build the first version, then run the job once uninterrupted to learn its result,
        its duration and how many kill sites it passes."""
        write_corpus(self.first_source, 24, seed=0)
        second = write_corpus(self.second_source, 36, seed=0)  # 12 new documents
        for i in range(0, 24, 5):  # and 5 changed ones
            (second / f"doc{i:03d}.txt").write_text("the fish swam home . " * (3 + i), encoding="utf-8")
        (second / "doc001.txt").unlink()  # and one deleted
        # Three versions (8, 16, 24 documents), so the job's commit also collects the oldest.
        staged = self.root / "src-staged"
        for count in (8, 16, 24):
            for i in range(count - 8, count):
                staged.mkdir(exist_ok=True)
                shutil.copy(self.first_source / f"doc{i:03d}.txt", staged)
            code, _ = run(Job("ingest", str(self.base), self.model, str(staged)))
            assert code == 0, f"building the first versions failed (exit {code})"
        if self.kind == "compact":  # an index with deleted rows and several segments
            code, _ = run(Job("ingest", str(self.base), self.model, str(self.second_source)))
            assert code == 0, f"building the compaction's index failed (exit {code})"
        self.before = snapshot(self.base)
        reference = self.root / "reference"
        shutil.copytree(self.base, reference)
        calls_file = self.root / "calls"
        code, self.duration = run(self.job(reference, calls_file=str(calls_file)))
        assert code == 0, f"the uninterrupted {self.kind} failed (exit {code})"
        self.after = snapshot(reference)
        self.calls = json.loads(calls_file.read_text())
        # A second timing (the first pays for cold caches): random kill times are drawn from
        # [0, duration], and a duration measured too long lets the job finish before its kill.
        again = self.root / "reference-again"
        shutil.copytree(self.base, again)
        code, duration = run(self.job(again))
        assert code == 0, f"the uninterrupted {self.kind} failed (exit {code})"
        self.duration = min(self.duration, duration)
        shutil.rmtree(again)
        return self

    def job(self, index: Path, **kwargs: Any) -> Job:
        source = str(self.second_source) if self.kind == "ingest" else None
        return Job(self.kind, str(index), self.model, source, **kwargs)

    def trial(self, name: str, *, kill_call: int | None = None, kill_after: bool = False,
              kill_seconds: float | None = None) -> dict[str, Any]:
        """Interrupt the job once, check the index, re-run it, check convergence."""
        assert self.before is not None and self.after is not None
        index = self.root / f"trial-{name}"
        shutil.copytree(self.base, index)
        marker = self.root / f"killed-{name}"
        marker.unlink(missing_ok=True)
        job = self.job(index, kill_call=kill_call, kill_after=kill_after, kill_marker=str(marker))
        code, seconds = run(job, kill_after_seconds=kill_seconds)
        outcome: dict[str, Any] = {"name": name, "exit": code, "kill_call": kill_call, "kill_after": kill_after,
                                   "kill_seconds": kill_seconds, "seconds": seconds,
                                   "killed_at": marker.read_text() if marker.exists() else None}
        if kill_seconds is not None and code == 0:
            # The job finished before the kill: no crash was tried, nothing to check.
            outcome["landed"] = False
            shutil.rmtree(index, ignore_errors=True)
            return outcome
        outcome["landed"] = code == -signal.SIGKILL
        try:
            state = snapshot(index)
        except Exception as exc:  # what the campaign exists to catch
            outcome.update(opens=False, error=f"{type(exc).__name__}: {exc}")
            return outcome
        outcome["opens"] = True
        outcome["live_version"] = state.version
        outcome["state"] = ("before" if state.same_content(self.before) and state.version == self.before.version
                            else "after" if state.same_content(self.after) else "other")
        outcome["leftovers"] = leftovers(index)
        code, _ = run(self.job(index))
        outcome["rerun_exit"] = code
        final = snapshot(index)
        outcome["converged"] = final.same_content(self.after) and len(final.vectors) == len(self.after.vectors)
        outcome["leftovers_after_rerun"] = [n for n in leftovers(index) if not n.startswith(".tmp-")]
        shutil.rmtree(index, ignore_errors=True)
        return outcome

    def ok(self, outcome: dict[str, Any]) -> bool:
        """An interrupted job left a complete version (old or new), and a re-run converged."""
        return bool(outcome.get("opens") and outcome["state"] in ("before", "after")
                    and outcome["rerun_exit"] == 0 and outcome["converged"]
                    and not outcome["leftovers_after_rerun"])


def site_points(calls: list[str]) -> list[tuple[int, bool, str]]:
    """Every (call number, after?, site) kill point of a job that made ``calls``."""
    return [(n, after, site) for n, site in enumerate(calls, start=1) for after in (False, True)]


def site_label(call: int, site: str, after: bool) -> str:
    """What a child killed at a site point writes in its kill marker."""
    return f"{call} {site} {'after' if after else 'before'}"


def killed_at_a_random_time(scenario: Scenario, seed: int, attempts: int = 4) -> dict[str, Any]:
    """A trial killed at a random time in the middle third of the job that actually landed.

    A job that finishes before its kill tried no crash; the delay is then re-drawn from the
    middle third of the duration that run took (bounded: ``attempts`` draws in all)."""
    duration = scenario.duration
    for attempt in range(attempts):
        delay = time_points(duration, 3, seed=seed + attempt)[1]
        outcome = scenario.trial(f"time-{delay:.3f}", kill_seconds=delay)
        if outcome["landed"] or outcome["exit"] != 0:
            outcome["attempts"] = attempt + 1
            return outcome
        duration = min(duration, outcome["seconds"])
    raise AssertionError(f"the {scenario.kind} finished before each of {attempts} random kills "
                         f"(last duration {duration:.2f} s); no crash was tried")


def time_points(duration: float, count: int, seed: int) -> list[float]:
    """``count`` random delays spread over the job's duration (stratified, so none cluster)."""
    rng = random.Random(seed)
    return [duration * (i + rng.random()) / count for i in range(count)]
