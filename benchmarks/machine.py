"""What machine a benchmark ran on: figures only compare within one machine, so every results
file names its CPU."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo (or the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def resident_mib() -> float:
    """This process's resident memory now, in MiB (/proc/self/statm; Linux)."""
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def checkouts(this: Path, compare: Path | None) -> dict[str, Path]:
    """The source trees a before/after benchmark runs, by name: ``compare`` (another checkout,
    e.g. the commit before a change exported with `git archive`) first, then this one."""
    trees = {"this checkout": this}
    return {"before (--compare)": compare.resolve(), **trees} if compare else trees
