"""The main job end to end with the real default model, through the installed command:
ingest the bundled sample corpus into a local index, then query it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.sample_corpus import sample_dir

pytestmark = pytest.mark.slow

HTP_INDEX = str(Path(sys.executable).with_name("htp-index"))


def run(*args: str) -> dict:
    done = subprocess.run([HTP_INDEX, *args, "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("e2e") / "index"
    stats = run("ingest", str(sample_dir()), "--index", str(index))
    assert stats["added"] == 11 and stats["failed"] == 0 and stats["nodes_embedded"] >= 11
    return index


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("How do honeybees tell other bees where the flowers are?", "honeybees.txt"),
        ("Which microbes make sourdough bread rise and taste sour?", "sourdough.md"),
    ],
)
def test_default_model_retrieves_the_right_document(sample_index, question, expected):
    results = run("query", question, "--index", str(sample_index), "-k", "3")["results"]
    assert results[0]["doc_id"] == expected
    assert results[0]["score"] > results[-1]["score"]


def test_index_records_the_default_encoder(sample_index):
    info = run("info", "--index", str(sample_index))
    assert info["encoder"]["model"] == "gemma3-270m" and info["encoder"]["method"] == "htp"
    assert info["dim"] == 640 and info["count"] >= 11
