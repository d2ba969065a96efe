"""Crash campaign: kill -9 ingest, rebuild and compact at every commit step and at random times.

For each of three jobs (an ingest that adds, changes and deletes documents; a rebuild to another
method and index kind; a compaction of an index with deleted rows in several segments) the uninterrupted run is recorded first. Then, per kill point, a copy of the
starting index is given to the job, the job is SIGKILLed, and we check that the index opens
(checksums verified) at the old or the new version, and that a re-run converges to the
uninterrupted result (same node ids, same vectors within 1e-5, same count). See
``tests/crash_harness.py`` for the mechanics; CI runs a handful of these points.

Writes benchmarks/results/crash_campaign.{json,md}.

    python benchmarks/crash_campaign.py [--time-points 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-points", type=int, default=15, help="random-time kills per job")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder the results files are written to")
    args = parser.parse_args()

    from crash_harness import Scenario, site_points, time_points
    from tiny_decoder import build_model, build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="htp-crash-campaign-"))
    began = time.perf_counter()
    try:
        model = work / "model"
        tokenizer = build_tokenizer("right")
        build_model(len(tokenizer)).save_pretrained(model)
        tokenizer.save_pretrained(model)
        jobs = []
        for kind in ("ingest", "rebuild", "compact"):
            (work / kind).mkdir()
            scenario = Scenario(work / kind, str(model), kind).prepare()
            print(f"{kind}: uninterrupted run {scenario.duration:.1f} s, {len(scenario.calls or [])} commit calls, "
                  f"{len(scenario.before.vectors)} -> {len(scenario.after.vectors)} nodes", flush=True)
            trials = []
            for call, after, site in site_points(scenario.calls or []):
                outcome = scenario.trial(f"{call}-{after}", kill_call=call, kill_after=after)
                outcome.update(kind="site", site=f"{'after' if after else 'before'} {site} #{call}", ok=scenario.ok(outcome))
                trials.append(outcome)
                print(f"  {kind} {outcome['site']:<32} -> {outcome.get('state')}, ok={outcome['ok']}", flush=True)
            for delay in time_points(scenario.duration, args.time_points, args.seed):
                outcome = scenario.trial(f"t{delay:.3f}", kill_seconds=delay)
                # a job that finished before its kill tried no crash: recorded, not counted as passed
                landed = outcome["landed"]
                outcome.update(kind="time", site=f"t={delay:.2f} s", ok=scenario.ok(outcome) if landed else None)
                trials.append(outcome)
                print(f"  {kind} {outcome['site']:<32} -> {outcome.get('state')} (exit {outcome['exit']}), "
                      f"ok={outcome['ok']}", flush=True)
            jobs.append({"job": kind, "duration_s": scenario.duration, "commit_calls": scenario.calls,
                         "nodes_before": len(scenario.before.vectors), "nodes_after": len(scenario.after.vectors),
                         "trials": trials})
        write_results(args.out, jobs, time.perf_counter() - began)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_results(out: Path, jobs: list[dict], seconds: float) -> None:
    from machine import cpu_model

    rows = []
    for job in jobs:
        trials = job["trials"]
        killed = [t for t in trials if t["exit"] == -9]
        states = Counter(t.get("state", "unopenable") for t in trials)
        rows.append({
            "job": job["job"], "points": len(trials), "killed": len(killed),
            "finished_before_kill": len(trials) - len(killed), "ok": sum(bool(t["ok"]) for t in trials),
            "opened_at_old": states["before"], "opened_at_new": states["after"],
            "other_or_unopenable": states["other"] + states["unopenable"],
            "converged": sum(bool(t.get("converged")) for t in trials),
        })
    total = {key: sum(r[key] for r in rows) for key in rows[0] if key != "job"}
    result = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "seconds": seconds, "summary": rows, "total": total, "jobs": jobs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "crash_campaign.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    header = ("| job | kill points | killed mid-run | opened at old version | opened at new version | "
              "other / unopenable | re-run converged | all checks passed |\n|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['job']} | {r['points']} | {r['killed']} | {r['opened_at_old']} | {r['opened_at_new']} | "
             f"{r['other_or_unopenable']} | {r['converged']} | {r['ok']} |" for r in [*rows, {"job": "**total**", **total}]]
    table = (f"# Crash campaign ({result['machine']}, {seconds / 60:.1f} min)\n\n"
             "Every commit step of each job is a kill point (just before and just after each call to\n"
             "mkdtemp, faiss.write_index, fsync, rename, replace, rmtree), plus random-time kills spread over\n"
             "the job's duration. Tiny random decoder, 24 -> 35 documents (ingest: 12 new, 5 changed,\n"
             "1 deleted), a rebuild htp/flat -> vanilla/hnsw and a compaction.\n\n" + header + "\n".join(lines) + "\n")
    from results_file import write_markdown

    write_markdown(out / "crash_campaign.md", table)
    print(table)


if __name__ == "__main__":
    main()
