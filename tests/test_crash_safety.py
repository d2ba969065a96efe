"""kill -9 during ingest and rebuild: the index opens at a complete version and a re-run
converges to the uninterrupted result. The full campaign (every commit step, many random
times) is ``benchmarks/crash_campaign.py``; CI runs a handful of its points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash_harness import (
    Scenario,
    killed_at_a_random_time,
    site_label,
    site_points,
    snapshot,
    write_corpus,
)

pytestmark = pytest.mark.timeout(600)


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


ATTEMPTS_TO_CATCH_STAGING = 5


def test_the_command_killed_while_writing_a_version(tiny_model_dir, tmp_path):
    """The real `htp-index ingest`, SIGKILLed the moment its staging directory appears."""
    env = {**os.environ, "HTP_INDEX_ENCODER__MODEL": str(tiny_model_dir), "HTP_INDEX_ENCODER__SEGMENTER": "sentencizer",
           "HTP_INDEX_CHUNK_SIZE": "64"}
    command = [sys.executable, "-m", "htp_cli", "ingest", str(write_corpus(tmp_path / "a", 6, seed=1)),
               "--index", str(tmp_path / "idx"), "--json"]
    subprocess.run(command, env=env, check=True, capture_output=True)
    versions = tmp_path / "idx" / "versions"
    # The staging directory lives for milliseconds; on busy cores the poll can miss it and the
    # ingest then simply lands, or the kill can arrive just after the staged manifest was renamed
    # in and CURRENT switched (a complete new version, as it should be). Each miss starts over with
    # more documents than the index now holds (so the killed ingest would still add some); only a
    # kill that the staging directory outlived counts: its writer died before the commit.
    caught = False
    for attempt in range(ATTEMPTS_TO_CATCH_STAGING):
        before = snapshot(tmp_path / "idx")
        command[4] = str(write_corpus(tmp_path / f"b{attempt}", 40 + 10 * attempt, seed=2 + attempt))
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".tmp-") for p in versions.iterdir()):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        killed = process.wait() == -signal.SIGKILL
        if killed and any(p.name.startswith(".tmp-") for p in versions.iterdir()):
            caught = True
            break
        snapshot(tmp_path / "idx")  # missed: whichever version is live must be complete
    assert caught, f"the ingest committed before it could be killed, {ATTEMPTS_TO_CATCH_STAGING} times"
    survived = snapshot(tmp_path / "idx")
    assert survived.version == before.version and survived.same_content(before)
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert len(snapshot(tmp_path / "idx").vectors) > len(before.vectors)
    assert not [p for p in Path(versions).iterdir() if p.name.startswith(".tmp-")]  # the dead writer's, collected
