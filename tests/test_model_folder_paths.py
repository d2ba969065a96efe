"""A local model folder is recorded as one absolute path, and the same weights at another
spelling of the path (or a moved folder, named again by the user) are the same encoder:
"./mymodel" recorded as typed could not be found from another directory, and "mymodel/"
for the same folder was refused as another encoder."""

from __future__ import annotations

import json
import shutil

import pytest
from pipeline_helpers import write_docs
from typer.testing import CliRunner

from htp_cli.main import app
from htp_embed import EncoderConfig
from htp_embed.fingerprint import accepts

runner = CliRunner()
WEIGHTS = "arch:0123456789abcdef/weights:" + "0" * 32


def run_json(*args: str, code: int = 0) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


@pytest.fixture()
def work(tiny_model_dir, tmp_path, monkeypatch):
    """A working folder holding the model as ./mymodel and documents in ./src."""
    shutil.copytree(tiny_model_dir, tmp_path / "work" / "mymodel")
    write_docs(tmp_path / "work" / "src")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HTP_INDEX_ENCODER__SEGMENTER", "sentencizer")
    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "48")
    return tmp_path / "work"


def test_a_local_folder_is_configured_as_its_absolute_path(work):
    for spelling in ("./mymodel", "mymodel/", str(work / "mymodel")):
        assert EncoderConfig(model=spelling).model == str(work / "mymodel")
    assert EncoderConfig(model="gemma3-270m").model == "gemma3-270m"


def test_the_cache_folder_is_expanded_and_absolute(work, monkeypatch):
    # "~/x" was a literal folder "~" under the working directory: models converted per directory
    from htp_embed.packaged_models import default_cache_dir

    monkeypatch.setenv("HOME", str(work / "home"))
    monkeypatch.setenv("HTP_INDEX_CACHE", "~/x")
    assert default_cache_dir() == work / "home" / "x"
    monkeypatch.setenv("HTP_INDEX_CACHE", "cache")
    assert default_cache_dir() == work / "cache"
    assert EncoderConfig(cache_dir="~/c").cache_dir == work / "home" / "c"
    assert EncoderConfig(cache_dir="c/../d").cache_dir == work / "d"
    assert EncoderConfig().cache_dir is None


def test_the_same_weights_at_another_path_are_accepted_and_other_weights_are_not():
    recorded = {"model": "./mymodel", "model_fingerprint": WEIGHTS, "method": "htp", "dim": 64}
    assert accepts(recorded, {**recorded, "model": "/elsewhere/mymodel"})
    assert not accepts(recorded, {**recorded, "model": "/elsewhere/mymodel", "model_fingerprint": WEIGHTS[:-1] + "1"})
    assert not accepts(recorded, {**recorded, "model": "/elsewhere/mymodel", "dim": 32})
    assert not accepts({**recorded, "model_fingerprint": "0123456789abcdef"}, {**recorded, "model": "/x"})


def test_an_index_built_with_a_relative_folder_is_queried_from_another_directory(work, monkeypatch):
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", "./mymodel")
    run_json("ingest", "src", "--index", "idx")
    again = run_json("ingest", "src", "--index", "idx")  # the same folder spelled otherwise
    assert again["unchanged"] == 3
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", "mymodel/")
    assert run_json("ingest", "src", "--index", "idx")["unchanged"] == 3
    monkeypatch.delenv("HTP_INDEX_ENCODER__MODEL")
    monkeypatch.chdir(work.parent)
    assert len(run_json("query", "the cat sat", "--index", "work/idx", "-k", "2")["results"]) == 2


def test_a_moved_folder_is_named_again_by_the_user(work, monkeypatch):
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", "mymodel")
    run_json("ingest", "src", "--index", "idx")
    (work / "mymodel").rename(work / "moved")
    monkeypatch.delenv("HTP_INDEX_ENCODER__MODEL")
    failure = run_json("query", "the cat sat", "--index", "idx", code=2)  # fails again unchanged
    assert str(work / "mymodel") in json.dumps(failure) and "HTP_INDEX_ENCODER__MODEL" in json.dumps(failure)
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", "moved")
    assert len(run_json("query", "the cat sat", "--index", "idx", "-k", "2")["results"]) == 2


def test_a_keyword_query_needs_no_model(work, monkeypatch):
    """A keyword-only query reads the keyword index alone: it answers when the model folder is
    gone (it used to fail as the dense query does), and the dense query still says what is missing."""
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", "mymodel")
    run_json("ingest", "src", "--index", "idx")
    (work / "mymodel").rename(work / "moved")
    monkeypatch.delenv("HTP_INDEX_ENCODER__MODEL")
    hits = run_json("query", "cat", "--index", "idx", "--mode", "sparse", "-k", "2")["results"]
    assert hits and all("cat" in hit["text"].lower() for hit in hits)
    for mode in ("dense", "hybrid"):
        assert str(work / "mymodel") in run_json("query", "cat", "--index", "idx", "--mode", mode, code=2)["error"]


def test_a_model_that_cannot_be_loaded_is_bad_usage(work):
    """Neither packaged nor a model folder, or a folder that is not a model: asking again
    unchanged fails again, so exit 2 (it was 1, the code of a run a retry may mend)."""
    for model in ("no-such-model", str(work / "src")):
        failure = run_json("ingest", "src", "--index", "idx", "--model", model, code=2)
        assert failure["ok"] is False and model in failure["error"]
    assert "no index at idx" in run_json("query", "cat", "--index", "idx", code=2)["error"]


def test_an_empty_model_name_is_refused_as_empty_not_as_the_working_folder(work, monkeypatch):
    """Path("") is the working folder: an empty model was reported as "model '<cwd>' is neither
    a packaged model ...", naming a folder the user never gave."""
    failure = run_json("ingest", "src", "--index", "idx", "--model", "", code=2)
    assert "the model is empty" in failure["error"] and str(work) not in failure["error"]
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", "")
    failure = run_json("ingest", "src", "--index", "idx", code=2)
    assert "encoder.model: the model is empty" in failure["error"] and str(work) not in failure["error"]
