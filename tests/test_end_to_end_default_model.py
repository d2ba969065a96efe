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


# Runs the command in-process with the side processes on or off, then says whether this
# process read the packaged tokenizer or imported spaCy.
COLD_QUERY = """
import json, sys
import htp_embed.text_ahead as ahead
if sys.argv[1] == "here":
    ahead.start = lambda *args, **kwargs: None
from htp_cli.main import app
from htp_embed.packaged_tokenizer import PackagedTokenizer
made = []
from_dir = PackagedTokenizer.from_dir.__func__
PackagedTokenizer.from_dir = classmethod(lambda cls, path: made.append(from_dir(cls, path)) or made[-1])
app(sys.argv[2:], standalone_mode=False)
print("READ=" + json.dumps([tokenizer.loaded for tokenizer in made] + ["spacy" in sys.modules]), file=sys.stderr)
"""


def test_a_cold_query_reads_neither_tokenizer_nor_spacy_and_finds_the_same(sample_index):
    """A cold `htp-index query` takes the packaged tokenizer's answers and the sentences from
    side processes (htp_embed.text_ahead): this process never reads tokenizer.json (~1 s) nor
    imports spaCy, and its hits are those of the same command doing both itself."""
    from htp_embed.text_ahead import _usable_cores

    args = ["query", "How do honeybees tell other bees where the flowers are?", "--index", str(sample_index),
            "-k", "5", "--json"]
    answers = {}
    for where in ("ahead", "here"):
        done = subprocess.run([sys.executable, "-c", COLD_QUERY, where, *args], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        read = json.loads(next(line for line in done.stderr.splitlines() if line.startswith("READ="))[5:])
        answers[where] = json.loads(done.stdout)["results"], read
    assert answers["ahead"][0] == answers["here"][0]
    assert answers["here"][1] == [True, True]  # the control: both done in the command's process
    if _usable_cores() >= 2:  # (on one core everything is done in-process)
        assert answers["ahead"][1] == [False, False]
