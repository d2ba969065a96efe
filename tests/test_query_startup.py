"""A cold `htp-index query` imports only what a query needs (issue 21: a quick first answer).

Each check runs the real command in a fresh interpreter, because what matters is what a cold
process pulls in, and a test process has imported everything already. Start-up time itself is
measured in benchmarks/query_startup.py, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import write_docs

ROOT = Path(__file__).resolve().parents[1]
# Orchestration, distribution and serving: never needed to answer one query; nor LlamaIndex
# (~1 s to import): a query searches indexes.SegmentStore and reads its rows.
NEVER_ON_THE_QUERY_PATH = ("prefect", "dask", "distributed", "fastapi", "uvicorn", "llama_index")

# Runs the command in-process, then prints the top-level packages it imported.
PROBE = """
import json, sys
from htp_cli.main import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print("MODULES=" + json.dumps(sorted({name.split(".")[0] for name in sys.modules})), file=sys.stderr)
"""


def imported_by(args: list[str], env: dict[str, str], cwd: Path) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("MODULES="))
    return set(json.loads(line.removeprefix("MODULES=")))


@pytest.fixture(scope="module")
def indexes(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An htp and a vanilla index of three small documents, built with the tiny model."""
    work = tmp_path_factory.mktemp("query-startup")
    write_docs(work / "src")
    env = {
        **os.environ, "HTP_INDEX_ENCODER__MODEL": str(tiny_model_dir),
        "HTP_INDEX_ENCODER__SEGMENTER": "sentencizer", "HTP_INDEX_CHUNK_SIZE": "48",
        "HTP_INDEX_CACHE": str(work / "cache"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for method in ("htp", "vanilla"):
        subprocess.run([sys.executable, "-m", "htp_cli", "ingest", "src", "--index", method, "--json"],
                       env={**env, "HTP_INDEX_ENCODER__METHOD": method}, cwd=work, check=True,
                       capture_output=True, timeout=300)
    return work, env


@pytest.mark.parametrize("method", ["htp", "vanilla"])
def test_a_query_imports_no_orchestration_or_server(indexes, method):
    work, env = indexes
    modules = imported_by(["query", "the cat sat", "--index", method, "-k", "2", "--json"], env, work)
    assert "torch" in modules  # the probe saw a real query
    assert not modules & set(NEVER_ON_THE_QUERY_PATH)


def test_a_keyword_query_loads_no_model(indexes):
    # A keyword-only query needs no vector: neither torch, transformers nor spaCy (seconds and
    # ~900 MB from a cold process with the packaged model; it loaded them all to embed nothing).
    work, env = indexes
    modules = imported_by(["query", "cat", "--index", "htp", "-k", "2", "--mode", "sparse", "--json"], env, work)
    assert "indexes" in modules  # the probe saw a real query
    assert not modules & {"torch", "transformers", "spacy", *NEVER_ON_THE_QUERY_PATH}


def test_an_htp_query_segments_in_a_side_process_with_the_same_results(indexes):
    # The query's text is segmented by a second interpreter while this one loads the model
    # (htp_embed.text_ahead): spaCy stays out of the command's process, and the hits equal
    # those of the same command segmenting in-process. (The packaged tokenizer's side process
    # is checked with the real default model in test_end_to_end_default_model.py.)
    from htp_embed.text_ahead import _usable_cores

    work, env = indexes
    args = ["query", "the cat sat. On a mat", "--index", "htp", "-k", "3", "--json"]
    if _usable_cores() >= 2:  # (on one core the text is segmented in-process)
        assert "spacy" not in imported_by(args, env, work)
    ahead = subprocess.run([sys.executable, "-m", "htp_cli", *args], capture_output=True, text=True, env=env,
                           cwd=work, timeout=300, check=True)
    here = subprocess.run([sys.executable, "-c", "import sys, htp_embed.text_ahead as s; "
                           "s.start = lambda *a, **k: None; from htp_cli.main import app; app(sys.argv[1:])",
                           *args], capture_output=True, text=True, env=env, cwd=work, timeout=300, check=True)
    assert json.loads(ahead.stdout)["results"] == json.loads(here.stdout)["results"]


def test_a_query_on_a_vanilla_index_does_not_load_spacy(indexes):
    # HTP lays a text out by sentences with spaCy (its segmenter is part of the recorded
    # encoder identity, so queries must be segmented the same way); other methods never need it.
    work, env = indexes
    modules = imported_by(["query", "the cat sat", "--index", "vanilla", "-k", "2", "--json"], env, work)
    assert "spacy" not in modules


def test_importing_the_command_line_does_not_import_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, htp_cli.main, htp_embed; "
         "print(sorted(m for m in ('torch', 'transformers', 'spacy') if m in sys.modules))"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=True,
    )
    assert done.stdout.strip() == "[]"
