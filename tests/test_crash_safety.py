"""kill -9 during ingest and rebuild: the index opens at a complete version and a re-run
converges to the uninterrupted result. The full campaign (every commit step, many random
times) is ``benchmarks/crash_campaign.py``; CI runs a handful of its points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_killed_at import STEPS
from crash_harness import (
    Scenario,
    killed_at_a_random_time,
    leftovers,
    site_label,
    site_points,
    snapshot,
    write_corpus,
)

pytestmark = pytest.mark.timeout(600)
KILLED_CLI = Path(__file__).with_name("cli_killed_at.py")


@pytest.fixture(scope="module")
def ingest_scenario(tiny_model_dir, tmp_path_factory) -> Scenario:
    return Scenario(tmp_path_factory.mktemp("crash-ingest"), str(tiny_model_dir), "ingest").prepare()


@pytest.fixture(scope="module")
def rebuild_scenario(tiny_model_dir, tmp_path_factory) -> Scenario:
    return Scenario(tmp_path_factory.mktemp("crash-rebuild"), str(tiny_model_dir), "rebuild").prepare()


@pytest.fixture(scope="module")
def compact_scenario(tiny_model_dir, tmp_path_factory) -> Scenario:
    return Scenario(tmp_path_factory.mktemp("crash-compact"), str(tiny_model_dir), "compact").prepare()


def pick(scenario: Scenario, wanted: list[tuple[str, bool]]) -> list[tuple[int, bool, str]]:
    """The first kill point at each wanted (site, after?) of the uninterrupted job."""
    points = site_points(scenario.calls or [])
    return [next(p for p in points if (p[2], p[1]) == w) for w in wanted]


def assert_killed_at(outcome: dict, call: int, site: str, after: bool) -> None:
    """The job died by SIGKILL, at the point meant: not a job that finished, failed, or counted
    its calls differently from the uninterrupted run and so died somewhere else."""
    assert outcome["exit"] == -signal.SIGKILL, f"not killed (exit {outcome['exit']}): {outcome}"
    assert outcome["killed_at"] == site_label(call, site, after), outcome


# The steps of a commit that matter most: data written but not sealed, published but not
# live, the pointer switch itself, and the collection of an old version after it.
INGEST_POINTS = [("faiss.write_index", True), ("os.rename", True), ("os.replace", False),
                 ("os.replace", True), ("shutil.rmtree", False)]
REBUILD_POINTS = [("os.rename", True), ("os.replace", True)]


def test_the_uninterrupted_jobs_change_the_index(ingest_scenario, rebuild_scenario):
    for scenario in (ingest_scenario, rebuild_scenario):
        assert not scenario.before.same_content(scenario.after)
    assert len(ingest_scenario.after.vectors) > len(ingest_scenario.before.vectors)
    assert rebuild_scenario.after.method == "vanilla" and rebuild_scenario.after.index_kind == "hnsw"
    assert "shutil.rmtree" in ingest_scenario.calls  # the old-version collection is exercised


@pytest.mark.parametrize(("site", "after"), INGEST_POINTS)
def test_ingest_killed_at_a_commit_step(ingest_scenario, site, after):
    (call, after, _), = pick(ingest_scenario, [(site, after)])
    outcome = ingest_scenario.trial(f"{site}-{after}", kill_call=call, kill_after=after)
    assert_killed_at(outcome, call, site, after)
    assert ingest_scenario.ok(outcome), outcome
    # before the pointer switch the old version serves; after it, the new one
    assert outcome["state"] == ("after" if site in ("shutil.rmtree",) or (site == "os.replace" and after) else "before")


@pytest.mark.parametrize(("site", "after"), REBUILD_POINTS)
def test_rebuild_killed_at_a_commit_step(rebuild_scenario, site, after):
    (call, after, _), = pick(rebuild_scenario, [(site, after)])
    outcome = rebuild_scenario.trial(f"{site}-{after}", kill_call=call, kill_after=after)
    assert_killed_at(outcome, call, site, after)
    assert rebuild_scenario.ok(outcome), outcome
    # before the pointer switch the old version serves; after it, the new one
    assert outcome["state"] == ("after" if site == "os.replace" and after else "before")


# Compaction writes one merged segment, publishes it, switches, then collects the merged-away
# segments and the oldest version: data written but unnamed, named but not live, live.
COMPACT_POINTS = [("faiss.write_index", True), ("os.rename", True), ("os.replace", True),
                  ("shutil.rmtree", True)]


@pytest.mark.parametrize(("site", "after"), COMPACT_POINTS)
def test_compaction_killed_at_a_commit_step(compact_scenario, site, after):
    assert compact_scenario.before.version != compact_scenario.after.version  # it does commit
    (call, after, _), = pick(compact_scenario, [(site, after)])
    outcome = compact_scenario.trial(f"{site}-{after}", kill_call=call, kill_after=after)
    assert_killed_at(outcome, call, site, after)
    assert compact_scenario.ok(outcome), outcome  # same content, no orphan after the re-run
    live = "after" if site == "shutil.rmtree" or (site == "os.replace" and after) else "before"
    assert outcome["live_version"] == (compact_scenario.after.version if live == "after"
                                       else compact_scenario.before.version)


@pytest.mark.parametrize("kind", ["ingest", "rebuild"])
def test_killed_at_a_random_time(ingest_scenario, rebuild_scenario, kind):
    scenario = ingest_scenario if kind == "ingest" else rebuild_scenario
    outcome = killed_at_a_random_time(scenario, seed=7)  # somewhere in the middle third
    assert outcome["exit"] == -signal.SIGKILL and outcome["landed"], outcome
    assert outcome["killed_at"] is None, outcome  # the parent's kill, not an armed site
    assert scenario.ok(outcome), outcome


@pytest.mark.parametrize("step", STEPS)
def test_the_command_killed_while_writing_a_version(tiny_model_dir, tmp_path, step):
    """The real `htp-index ingest`, SIGKILLed while a version is staged: just after its staging
    folder appears, or with the folder complete but not yet renamed into place. The index must
    serve the version before, untouched, and the next run must land and collect what the dead
    writer left (its staging folder and the segments it had published for that version)."""
    env = {**os.environ, "HTP_INDEX_ENCODER__MODEL": str(tiny_model_dir), "HTP_INDEX_ENCODER__SEGMENTER": "sentencizer",
           "HTP_INDEX_CHUNK_SIZE": "64"}
    index = tmp_path / "idx"
    command = [sys.executable, "-m", "htp_cli", "ingest", str(write_corpus(tmp_path / "a", 6, seed=1)),
               "--index", str(index), "--json"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    before = snapshot(index)
    command[4] = str(write_corpus(tmp_path / "b", 12, seed=2))
    killed = subprocess.run([sys.executable, str(KILLED_CLI), step, *command[3:]], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    staging, = [p for p in (index / "versions").iterdir() if p.name.startswith(".tmp-")]  # it died staging
    assert (staging / "manifest.json").exists() == (step == "staging-complete")
    survived = snapshot(index)
    assert survived.version == before.version and survived.same_content(before)
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert len(snapshot(index).vectors) > len(before.vectors)
    assert leftovers(index) == []  # the dead writer's staging folder and segments, collected
