"""The htp-index command end to end (in-process through typer), with --json output."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import cli_env, write_docs
from typer.testing import CliRunner

from htp_cli.main import app

runner = CliRunner()


@pytest.fixture()
def env(tiny_model_dir, tmp_path, monkeypatch):
    return cli_env(tiny_model_dir, tmp_path, monkeypatch)


def run_json(*args: str, code: int = 0) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


def test_ingest_query_info_with_json(env):
    write_docs(env / "src")
    stats = run_json("ingest", "src", "--index", "idx")
    assert {k: stats[k] for k in ("added", "updated", "deleted", "unchanged", "failed")} == {
        "added": 3, "updated": 0, "deleted": 0, "unchanged": 0, "failed": 0,
    }
    assert stats["nodes_embedded"] == 3 and isinstance(stats["seconds"], float) and stats["errors"] == []
    again = run_json("ingest", "src", "--index", "idx")
    assert again["nodes_embedded"] == 0 and again["unchanged"] == 3

    answer = run_json("query", "the cat sat", "--index", "idx", "-k", "2")
    results = answer["results"]
    assert len(results) == 2 and answer["warnings"] == []
    assert set(results[0]) == {"node_id", "doc_id", "score", "text", "metadata"}

    filtered = run_json("query", "the cat", "--index", "idx", "--filter", "file_type=md")["results"]
    assert [r["doc_id"] for r in filtered] == ["sea.md"]

    info = run_json("info", "--index", "idx")
    assert info["count"] == 3 and info["index_kind"] == "auto" and info["encoder"]["method"] == "htp"
    assert set(info) >= {"count", "dim", "version", "index_kind", "encoder"}
    assert info["encoder_check"] == {"documents": 2, "queries": 2}


def test_every_json_answer_says_ok_as_its_exit_code_does(env):
    """verify alone said "ok": true; a script checking .ok read a successful ingest, query,
    info ... as a failure, since only failures carried the key."""
    write_docs(env / "src")
    answers = [run_json("ingest", "src", "--index", "idx"), run_json("rebuild", "--index", "idx"),
               run_json("query", "the cat", "--index", "idx"), run_json("info", "--index", "idx"),
               run_json("verify", "--index", "idx"), run_json("compact", "--index", "idx"),
               run_json("migrate", "--index", "idx"), run_json("restore", "--index", "idx", "--version", "1")]
    assert [answer["ok"] for answer in answers] == [True] * len(answers)
    assert "added" in answers[0] and "results" in answers[2] and "count" in answers[3]  # nothing else changed
    (env / "src" / "empty.md").write_text("")
    partial = run_json("ingest", "src", "--index", "idx", code=3)  # some documents failed: not ok
    assert (partial["ok"], partial["exit_code"], partial["failed"]) == (False, 3, 1)


def test_partial_failure_exits_3_and_lists_errors(env):
    write_docs(env / "src")
    (env / "src" / "bad.txt").write_bytes(b"\xff\xfe\x00garbage\xff")
    (env / "src" / "empty.md").write_text("")
    stats = run_json("ingest", "src", "--index", "idx", code=3)
    assert stats["added"] == 3 and stats["failed"] == 2
    assert {e["doc_id"] for e in stats["errors"]} == {"bad.txt", "empty.md"}


def test_text_and_names_that_look_like_rich_markup_are_printed_as_they_are(env):
    """A closing tag in a document ("[/quote]" in a forum dump) crashed the results table with
    a MarkupError, and in an ingest's failure list after the version was committed (exit 1,
    where the run had only partly failed); "[red]" in a file name vanished from what was shown."""
    write_docs(env / "src", {"notes[red]v2.txt": "the cat sat [/bold] on the mat [b]here[/b]."})
    (env / "src" / "empty[red].md").write_text("")
    (env / "src" / "forum.jsonl").write_text('{"_id": "post[/quote]", "text": ""}\n')
    ingested = runner.invoke(app, ["ingest", "src", "--index", "idx"])
    assert ingested.exit_code == 3, ingested.output
    shown = "".join(ingested.output.split())
    assert "failedempty[red].md:" in shown and "[/quote]" in shown and "Traceback" not in ingested.output
    for question in ("the cat", "list[/index] cat"):
        answered = runner.invoke(app, ["query", question, "--index", "idx", "--mode", "sparse"])
        assert answered.exit_code == 0, answered.output
        shown = "".join(answered.output.split())
        assert "notes[red]v2.txt" in shown and "[/bold]onthemat[b]here[/b]" in shown
        assert "".join(question.split()) in shown


def test_rebuild_switches_method_and_index_kind(env):
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    before = run_json("info", "--index", "idx")
    stats = run_json("rebuild", "--index", "idx", "--method", "vanilla", "--index-kind", "hnsw")
    assert stats["nodes_embedded"] == 3 and stats["failed"] == 0
    after = run_json("info", "--index", "idx")
    assert after["encoder"]["method"] == "vanilla" and after["index_kind"] == "hnsw"
    assert after["version"] > before["version"] and after["count"] == 3
    # the rebuilt index keeps its documents' hashes: a re-ingest embeds nothing
    assert run_json("ingest", "src", "--index", "idx")["nodes_embedded"] == 0


def test_full_depth_is_written_full_where_there_is_no_null(env):
    """exit_layer None (every layer and the final norm) could be set from Python only: TOML,
    environment variables and --exit-layer have no null. They say "full"."""
    write_docs(env / "src")
    (env / "htp-index.toml").write_text('[encoder]\nexit_layer = "full"\n')
    run_json("ingest", "src", "--index", "idx")
    assert run_json("info", "--index", "idx")["encoder"]["exit_layer"] is None
    (env / "htp-index.toml").unlink()
    run_json("rebuild", "--index", "idx", "--exit-layer", "2")
    assert run_json("info", "--index", "idx")["encoder"]["exit_layer"] == 2
    run_json("rebuild", "--index", "idx", "--exit-layer", "full")
    assert run_json("info", "--index", "idx")["encoder"]["exit_layer"] is None
    refused = runner.invoke(app, ["rebuild", "--index", "idx", "--exit-layer", "deep"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "'full' or 'default'" in said and "input_value" not in said
    assert "re-embedding" not in said  # refused before the progress bar


def test_dtype_option_sets_the_encoders_precision_on_every_command_that_embeds(env, monkeypatch):
    """Issue 21 asks for --dtype float32|bfloat16 to override auto's measured choice; only the
    settings file and HTP_INDEX_ENCODER__DTYPE could."""
    from htp_embed.encoder import HTPEncoder

    seen: list[str] = []
    load = HTPEncoder.__init__

    def spy(self, config=None, **kwargs):
        load(self, config, **kwargs)
        seen.append(self.config.dtype)

    monkeypatch.setattr(HTPEncoder, "__init__", spy)
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx", "--dtype", "bfloat16")
    run_json("query", "cat", "--index", "idx", "--mode", "dense", "--dtype", "float32")
    run_json("rebuild", "--index", "idx", "--dtype", "bfloat16")
    assert seen == ["bfloat16", "float32", "bfloat16"]
    refused = run_json("query", "cat", "--index", "idx", "--dtype", "double", code=2)
    assert "dtype 'double' is not one of auto, float32, bfloat16, float16" in refused["error"]
    assert "--dtype" in runner.invoke(app, ["serve", "--help"]).output


def test_missing_index_is_a_clear_error(env):
    result = runner.invoke(app, ["query", "x", "--index", "nowhere"])
    assert result.exit_code == 2 and "no index at nowhere" in result.output  # a wrong path: bad usage


def test_a_missing_source_leaves_no_index_folder_behind(env):
    # a mistyped source left a new, empty index folder holding its lock file
    failure = run_json("ingest", "nosuchsrc", "--index", "idx", code=1)
    assert "does not exist" in failure["error"] and not (env / "idx").exists()
    (env / "data.csv").write_text("name,fruit\nann,apple\n")  # nor does a file of a type no ingest reads
    refused = run_json("ingest", "data.csv", "--index", "idx", code=2)
    assert "unsupported file type '.csv'" in refused["error"] and not (env / "idx").exists()


def test_exclude_leaves_files_out_and_deletes_them_once_excluded(env):
    src = write_docs(env / "src")
    (src / "logo.png").write_bytes(b"\x89PNG not text")
    failed = runner.invoke(app, ["ingest", "src", "--index", "idx", "--json"])
    assert failed.exit_code == 3  # an unsupported file is reported...
    stats = run_json("ingest", "src", "--index", "idx", "--exclude", "*.png", "--exclude", "night.txt")
    assert (stats["failed"], stats["deleted"], stats["count"]) == (0, 1, 2)  # ...unless excluded
    assert run_json("ingest", "src", "--index", "idx", "--exclude", "*.png")["added"] == 1


def test_an_excluded_document_is_kept_with_keep_missing_as_ingest_help_says(env):
    """--help and README said an excluded document "is deleted"; --keep-missing keeps it."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    kept = run_json("ingest", "src", "--index", "idx", "--exclude", "night.txt", "--keep-missing")
    assert (kept["deleted"], kept["count"]) == (0, 3)
    said = " ".join(runner.invoke(app, ["ingest", "--help"]).output.replace("│", " ").split())
    assert "deleted, or kept with --keep-missing" in said

def test_rebuild_from_source_leaves_out_what_exclude_names_as_ingest_does(env):
    """rebuild had no --exclude: a rebuild from the folder brought excluded files back."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx", "--exclude", "night.txt")
    rebuilt = run_json("rebuild", "--index", "idx", "--source", "src", "--exclude", "night.txt")
    assert run_json("info", "--index", "idx")["count"] == 2 and rebuilt["failed"] == 0
    alone = runner.invoke(app, ["rebuild", "--index", "idx", "--exclude", "night.txt"])
    assert alone.exit_code == 2 and "--exclude goes with --source" in " ".join(alone.output.split())


def test_exclude_with_a_one_file_source_is_refused_not_ignored(env):
    """ingest recs.jsonl --exclude '*.jsonl' indexed the file, and ingest src/a.md --exclude a.md
    added it: the patterns (a folder's) were passed over without a word."""
    src = write_docs(env / "src")
    (env / "recs.jsonl").write_text('{"_id": "1", "text": "the cat sat ."}\n')
    for source, pattern in (("recs.jsonl", "*.jsonl"), ("src/night.txt", "night.txt")):
        refused = run_json("ingest", source, "--index", "idx", "--exclude", pattern, code=2)
        assert "--exclude applies to a source folder" in refused["error"] and not (env / "idx").exists()
    run_json("ingest", "src", "--index", "idx")
    rebuilt = runner.invoke(app, ["rebuild", "--index", "idx", "--source", str(src / "night.txt"), "--exclude", "x"])
    assert rebuilt.exit_code == 2 and "applies to a source folder" in " ".join(rebuilt.output.split())

def test_a_lost_current_file_with_kept_versions_is_mended_by_restore_not_a_fresh_ingest(env):
    """With CURRENT gone, every command said "no index ... create one with ingest", which would
    have started over the kept versions; ingest did start a new index over them."""
    src = write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    (src / "more.txt").write_text("the bird sang in the tree .")
    live = run_json("ingest", "src", "--index", "idx")["version"]
    (env / "idx" / "CURRENT").unlink()
    hint = f"`htp-index restore --index idx --version {live}` makes one live"
    for args in (["info"], ["verify"], ["query", "bird"], ["ingest", "src"]):
        result = runner.invoke(app, [*args, "--index", "idx", "--json"])
        said = json.loads(result.stdout)["error"]
        assert result.exit_code != 0 and "CURRENT is missing" in said and hint in said, (args, said)
    assert sorted(p.name for p in (env / "idx" / "versions").iterdir())[-1] == f"v{live:06d}"
    run_json("restore", "--index", "idx", "--version", str(live))
    assert run_json("info", "--index", "idx")["count"] == 4

def test_a_repeated_restore_of_the_oldest_kept_version_says_why_it_is_gone(env):
    """The restore pushed the version out (keep_versions 3); asked again, the refusal named the
    kept versions only, though no record says the live one holds its content."""
    src = write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    for n in (1, 2):
        (src / f"more{n}.txt").write_text(f"the bird {n} sang in the tree .")
        run_json("ingest", "src", "--index", "idx")
    oldest = min(int(p.name[1:]) for p in (env / "idx" / "versions").iterdir())
    run_json("restore", "--index", "idx", "--version", str(oldest))
    again = runner.invoke(app, ["restore", "--index", "idx", "--version", str(oldest)])
    said = " ".join(again.output.replace("│", " ").split())
    assert again.exit_code == 2 and "may already hold its content" in said, said

def test_every_option_is_documented():
    import typer.main

    group = typer.main.get_command(app)
    undocumented = []
    for name, command in group.commands.items():  # every command, eval included
        assert command.help, f"{name} has no help text"
        for param in command.params:
            if param.name == "help":
                continue
            if not (getattr(param, "help", None) or "").strip():
                undocumented.append(f"{name} {param.opts[0]}")
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, result.output
    assert set(group.commands) >= {"ingest", "rebuild", "query", "serve", "schedule", "info", "demo", "eval"}
    assert undocumented == []


def test_help_fills_an_80_column_terminal_without_breaking_sentences():
    """Rich help keeps a docstring's line breaks: the source's 100-column wrap showed as a
    line cut mid-sentence every line or two at 80 columns, and the command list showed each
    command's first paragraph cut the same way. Each paragraph is one flowing text now, and
    the list gives a one-line summary."""
    import typer.main

    group = typer.main.get_command(app)
    for name in group.commands:
        output = runner.invoke(app, [name, "--help"], terminal_width=80, env={"COLUMNS": "80"}).output
        prose = output.split("╭", 1)[0].splitlines()[3:]  # the description, before the first box
        paragraphs = "\n".join(line.strip() for line in prose).strip().split("\n\n")
        for paragraph in paragraphs:
            lines = paragraph.splitlines()
            short = [line for line in lines[:-1] if len(line) < 60]  # only a paragraph's last line ends early
            assert not short, (name, short)
    listing = runner.invoke(app, ["--help"], terminal_width=80, env={"COLUMNS": "80"}).output
    listed = " ".join(listing.replace("│", " ").split())
    for name in group.commands:
        summary = group.commands[name].help.split("\n\n")[0]
        assert len(summary) < 140, (name, summary)  # at most two lines beside the name
        assert "\n" not in summary and " ".join(summary.split()) in listed, (name, summary)


def test_verify_compact_and_migrate(env):
    from indexes_fixtures import make_nodes, unit_rows, write_format1_index

    from indexes import read_manifest

    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    (env / "src" / "more.txt").write_text("the bird sang in the tree .")
    run_json("ingest", "src", "--index", "idx")
    assert len(read_manifest(env / "idx").segments) == 2
    checked = run_json("verify", "--index", "idx")
    assert checked["ok"] and checked["files"] > 10
    compacted = run_json("compact", "--index", "idx")
    assert (compacted["merges"], compacted["segments_before"], compacted["segments_after"]) == (1, 2, 1)
    results = run_json("query", "the bird", "--index", "idx", "-k", "1")["results"]
    assert results[0]["doc_id"] == "more.txt"
    segment = read_manifest(env / "idx").segments[0]
    path = env / "idx" / "segments" / segment.name / "vectors.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", "--index", "idx"])
    assert bad.exit_code == 1 and "vectors.faiss" in bad.output and "sha256" in bad.output
    # Roll back to the version before the compaction: its segments were never touched.
    live = compacted["version"]
    restored = run_json("restore", "--index", "idx", "--version", str(live - 1))
    assert restored == {"ok": True, "restored": live - 1, "version": live + 1}
    # the live version again: nothing to do, and no kept version is pushed out for a copy of it
    versions = sorted(p.name for p in (env / "idx" / "versions").iterdir())
    assert run_json("restore", "--index", "idx", "--version", str(live + 1)) == {"ok": True, "restored": live + 1, "version": live + 1}
    assert sorted(p.name for p in (env / "idx" / "versions").iterdir()) == versions
    assert run_json("verify", "--index", "idx")["ok"]
    assert run_json("query", "the bird", "--index", "idx", "-k", "1")["results"][0]["doc_id"] == "more.txt"
    # a version not kept is bad usage naming the kept ones, not "corrupted: the version directory is missing"
    gone = runner.invoke(app, ["restore", "--index", "idx", "--version", "99"])
    assert gone.exit_code == 2 and "does not keep version 99" in gone.output and "corrupted" not in gone.output

    import numpy as np

    write_format1_index(env / "old", make_nodes(unit_rows(np.random.default_rng(0), 5, 8)))
    info = run_json("info", "--index", "old")
    assert info["format"] == 1 and info["count"] == 5
    migrated = runner.invoke(app, ["migrate", "--index", "old"])
    assert migrated.exit_code == 0 and "version 2" in migrated.output
    assert run_json("info", "--index", "old")["format"] == 2


def test_maintenance_commands_keep_the_versions_the_settings_ask_for(env, monkeypatch):
    """keep_versions = 6: ingest keeps six versions, and compact (even with nothing to merge)
    must not prune them to a default of its own."""
    from indexes import persist

    monkeypatch.setenv("HTP_INDEX_KEEP_VERSIONS", "6")
    source = write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    for i in range(4):
        (source / f"more{i}.txt").write_text(f"the bird {i} sang in the tree .")
        run_json("ingest", "src", "--index", "idx")
    before = persist.list_versions(env / "idx")
    assert len(before) == 5
    run_json("compact", "--index", "idx")
    run_json("compact", "--index", "idx")  # nothing left to merge: only the clean-up runs
    after = persist.list_versions(env / "idx")
    assert set(before) <= set(after) and len(after) == 6


def test_rebuild_from_source_keeps_a_document_it_cannot_read(env):
    """As ingest does, a rebuild from a source keeps the indexed version of a document whose
    file can no longer be read (it was left out of the new version without a word)."""
    source = write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    (source / "sea.md").write_bytes("fish swam in the sea . caf\xe9 .".encode("latin-1"))
    kept = run_json("ingest", "src", "--index", "idx", code=3)
    assert kept["failed"] == 1 and run_json("info", "--index", "idx")["count"] == 3
    rebuilt = run_json("rebuild", "--index", "idx", "--source", "src", "--index-kind", "flat", code=3)
    assert rebuilt["failed"] == 1 and "kept" in json.dumps(rebuilt["errors"])
    assert run_json("info", "--index", "idx")["count"] == 3
    hits = run_json("query", "fish swam in the sea", "--index", "idx", "-k", "3")["results"]
    assert "sea.md" in {hit["doc_id"] for hit in hits}
    (source / "sea.md").unlink()  # a document gone from the source is gone from the rebuild
    run_json("rebuild", "--index", "idx", "--source", "src")
    assert run_json("info", "--index", "idx")["count"] == 2


def test_rebuild_takes_the_index_kind_the_settings_set(env, monkeypatch):
    """index_kind set in the settings: ingest refuses the other kind and names rebuild; the
    rebuild it names must then write that kind (it kept the old one and reported success)."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    monkeypatch.setenv("HTP_INDEX_INDEX_KIND", "flat")
    refused = runner.invoke(app, ["ingest", "src", "--index", "idx", "--json"])
    assert refused.exit_code == 2 and "rebuild" in refused.output  # bad usage: only rebuild changes it
    run_json("rebuild", "--index", "idx", "--keep-vectors")
    assert run_json("info", "--index", "idx")["index_kind"] == "flat"
    run_json("ingest", "src", "--index", "idx")
    run_json("rebuild", "--index", "idx", "--index-kind", "hnsw")  # the flag wins over the settings
    assert run_json("info", "--index", "idx")["index_kind"] == "hnsw"


def test_eval_pipeline_reports_the_model_that_built_the_index(env, tiny_model_dir, monkeypatch):
    """A reused index embeds with the encoder it records; the report's ``model`` said the
    settings' model (the default one, which never ran, when none was set)."""
    from pipelines.beir import Document, write_beir

    corpus = {f"d{i}": Document(f"title {i}", f"the cat {i} sat on the mat near the dog {i} .") for i in range(10)}
    data = write_beir(env / "beir", corpus, {"q1": "the cat 3"}, {"q1": {"d3": 1}}, split="train")
    built = runner.invoke(app, ["eval", str(data), "--pipeline", "--index-dir", "idx", "--json"])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["model"] == str(tiny_model_dir)
    monkeypatch.delenv("HTP_INDEX_ENCODER__MODEL")  # the index knows its model
    again = runner.invoke(app, ["eval", str(data), "--pipeline", "--index-dir", "idx", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["model"] == run_json("info", "--index", "idx")["encoder"]["model"] == str(tiny_model_dir)
    # the settings' query_mode is the mode scored, as `htp-index query` searches (was hybrid)
    monkeypatch.setenv("HTP_INDEX_QUERY_MODE", "sparse")
    sparse = runner.invoke(app, ["eval", str(data), "--pipeline", "--index-dir", "idx", "--json"])
    assert sparse.exit_code == 0, sparse.output
    assert json.loads(sparse.stdout)["mode"] == "sparse" and json.loads(again.stdout)["mode"] == "hybrid"
    assert json.loads(sparse.stdout)["ok"] is True


def test_eval_pipeline_given_a_settings_file_that_is_not_there_is_a_usage_error(tmp_path, monkeypatch):
    """eval --pipeline exited 1 (a failed run) where every other command said 2."""
    from pipelines.beir import Document, write_beir

    monkeypatch.chdir(tmp_path)
    data = write_beir(tmp_path / "beir", {"d1": Document("t", "the cat sat .")}, {"q1": "cat"}, {"q1": {"d1": 1}},
                      split="train")
    for extra, env, said in [(["--config", "nonexist.toml"], {}, "--config nonexist.toml does not name a file"),
                             ([], {"HTP_INDEX_CONFIG": "nonexist"}, "HTP_INDEX_CONFIG=nonexist does not name a file")]:
        result = runner.invoke(app, ["eval", str(data), "--pipeline", *extra, "--json"], env=env)
        failure = json.loads(result.stdout)
        assert (result.exit_code, failure["exit_code"]) == (2, 2) and said in failure["error"], result.output


def test_an_empty_source_does_not_delete_the_whole_index(env):
    """A scheduled ingest of a folder that is suddenly empty (an unmounted share) would delete
    every document and exit 0; it is refused and the index is left as it was."""
    import shutil

    source = write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    version = run_json("info", "--index", "idx")["version"]
    shutil.rmtree(source)
    source.mkdir()
    refused = runner.invoke(app, ["ingest", "src", "--index", "idx", "--json"])
    assert refused.exit_code == 1 and "holds no documents" in refused.output
    info = run_json("info", "--index", "idx")
    assert (info["count"], info["version"]) == (3, version)
    (source / "one.txt").write_text("the owl hooted at the moon .")  # one document left: deletions go ahead
    assert run_json("ingest", "src", "--index", "idx")["deleted"] == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("title=a<=b", ("title", "==", "a<=b")),  # the first operator splits; the value keeps the rest
        ("year>=2020", ("year", ">=", 2020)),
        ("k!=v", ("k", "!=", "v")),
        ("a==b", ("a", "==", "b")),
        ('name="q=1"', ("name", "==", "q=1")),
        ("tags~=pets", ("tags", "contains", "pets")),
        ("a~b=c", ("a~b", "==", "c")),
    ],
)
def test_a_cli_filter_splits_at_its_first_operator(text, expected):
    from htp_cli.main import _parse_filters

    parsed = _parse_filters([text]).filters[0]
    assert (parsed.key, parsed.operator.value, parsed.value) == expected


@pytest.mark.parametrize("text", ["=x", "novalue"])
def test_a_cli_filter_without_key_or_operator_is_refused(text):
    import typer

    from htp_cli.main import _parse_filters

    with pytest.raises(typer.BadParameter):
        _parse_filters([text])


def test_an_index_keeps_one_node_size_and_refuses_another_without_a_rebuild(env, monkeypatch):
    """The splitting is recorded with the index: a later run without the setting splits new
    documents the same way, an explicitly different one is refused (it was accepted and applied
    to changed documents only: one index, two node sizes), and rebuild --source re-splits all."""
    from pipeline_helpers import long_doc

    write_docs(env / "src", {"long.txt": long_doc(40), "other.txt": long_doc(40, seed=3)})
    run_json("ingest", "src", "--index", "idx")
    info = run_json("info", "--index", "idx")
    at_48 = info["count"]
    assert info["splitting"]["chunk_size"] == 48 and at_48 > 4

    refused = runner.invoke(app, ["ingest", "src", "--index", "idx", "--chunk-size", "400", "--json"])
    assert refused.exit_code == 2 and "rebuild" in refused.output and "--source" in refused.output
    assert run_json("info", "--index", "idx")["count"] == at_48

    monkeypatch.delenv("HTP_INDEX_CHUNK_SIZE")  # no setting: the recorded size, not the default
    (env / "src" / "third.txt").write_text(long_doc(40, seed=5))
    run_json("ingest", "src", "--index", "idx")
    assert run_json("info", "--index", "idx")["splitting"]["chunk_size"] == 48

    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "400")
    assert runner.invoke(app, ["rebuild", "--index", "idx", "--keep-vectors", "--json"]).exit_code == 2
    run_json("rebuild", "--index", "idx", "--source", "src")
    info = run_json("info", "--index", "idx")
    assert info["splitting"]["chunk_size"] == 400 and info["count"] < at_48
    run_json("ingest", "src", "--index", "idx")  # the recorded size now: nothing to refuse


def test_correction_none_chosen_at_creation_survives_a_run_without_the_setting(env, monkeypatch):
    """`info` showed correction null and nothing else; the next ingest without the setting
    fitted 'center' once the index held 8 nodes, then refused HTP_INDEX_CORRECTION=none."""
    from pipeline_helpers import long_doc

    monkeypatch.setenv("HTP_INDEX_CORRECTION", "none")
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    monkeypatch.delenv("HTP_INDEX_CORRECTION")
    write_docs(env / "src", {f"more{i}.txt": long_doc(2, seed=i) for i in range(7)})
    run_json("ingest", "src", "--index", "idx")
    info = run_json("info", "--index", "idx")
    assert info["count"] >= 8 and info["correction"] is None and info["correction_kind"] == "none"
    monkeypatch.setenv("HTP_INDEX_CORRECTION", "none")
    (env / "src" / "last.txt").write_text("the last text about the hill .")
    assert run_json("ingest", "src", "--index", "idx")["added"] == 1


def test_a_refused_node_size_names_only_the_options_the_command_has(env, monkeypatch):
    """rebuild's refusal said "drop the setting (--chunk-size, ...)", an option rebuild does not
    have; and no command has --chunk-overlap."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "400")
    monkeypatch.setenv("HTP_INDEX_CHUNK_OVERLAP", "4")
    for args in (["rebuild"], ["rebuild", "--keep-vectors"]):
        said = run_json(*args, "--index", "idx", code=2)["error"]
        assert "HTP_INDEX_CHUNK_SIZE or chunk_size in the settings file" in said and "--chunk-" not in said, said
    said = run_json("ingest", "src", "--index", "idx", code=2)["error"]
    assert "drop the setting (--chunk-size, HTP_INDEX_CHUNK_SIZE or chunk_size in the settings file; " \
           "HTP_INDEX_CHUNK_OVERLAP or chunk_overlap in the settings file)" in said, said


def test_an_index_from_before_node_sizes_were_recorded_records_one_at_its_next_write(env):
    """Such an index took any --chunk-size, forever, and mixed node sizes without a word."""
    from indexes import persist
    from indexes.spec import Manifest

    write_docs(env / "src")
    version = run_json("ingest", "src", "--index", "idx")["version"]
    path = persist.version_dir(env / "idx", version) / "manifest.json"
    older = Manifest.model_validate_json(path.read_text()).model_copy(update={"splitting": None})
    path.write_text(older.sealed().model_dump_json())  # as an older htp-index wrote it
    assert run_json("info", "--index", "idx")["splitting"] is None
    (env / "src" / "new.txt").write_text("the dog ran in the park.")
    recorded = runner.invoke(app, ["ingest", "src", "--index", "idx"])
    assert recorded.exit_code == 0 and "records no node size" in " ".join(recorded.output.split())
    assert run_json("info", "--index", "idx")["splitting"]["chunk_size"] == 48
    refused = runner.invoke(app, ["ingest", "src", "--index", "idx", "--chunk-size", "400", "--json"])
    assert refused.exit_code == 2 and "two sizes" in refused.output


def test_encoder_settings_the_index_cannot_follow_are_said_by_query_and_rebuild_keep_vectors(env, monkeypatch):
    """`rebuild --keep-vectors` refused --method as a flag but passed over the same setting from
    the environment or the settings file without a word; query's warning showed K as
    "KPolicy(kind='fixed', k=3, max_blocks=8)"."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    monkeypatch.setenv("HTP_INDEX_ENCODER__K", "3")
    queried = runner.invoke(app, ["query", "the cat", "--index", "idx"])
    said = " ".join(queried.output.split())
    assert queried.exit_code == 0 and "queries are embedded with it, not as the settings ask (k=3)" in said
    monkeypatch.delenv("HTP_INDEX_ENCODER__K")
    monkeypatch.setenv("HTP_INDEX_ENCODER__METHOD", "vanilla")
    rebuilt = runner.invoke(app, ["rebuild", "--index", "idx", "--keep-vectors"])
    said = " ".join(rebuilt.output.split())
    assert rebuilt.exit_code == 0 and "its stored vectors are kept as that encoder made them" in said
    assert "method='vanilla'" in said and "drop --keep-vectors" in said
    assert run_json("info", "--index", "idx")["encoder"]["method"] == "htp"


def test_a_settings_file_error_names_the_file_or_where_the_key_belongs(env):
    """"Invalid value (at line 1, column 9)" named no file, and a top-level "method = ..." said
    only "Extra inputs are not permitted"."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    (env / "broken.toml").write_text("alpha = = 3\n")
    (env / "flat.toml").write_text('method = "vanilla"\n')
    for config, said in [("broken.toml", "the settings file broken.toml is not valid TOML: Invalid value (at line 1"),
                         ("flat.toml", "method is an encoder setting: put it under [encoder]")]:
        result = runner.invoke(app, ["query", "cat", "--index", "idx", "--config", config])
        assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output


def test_a_node_size_past_the_encoders_window_is_refused_or_refitted(env, monkeypatch):
    """--chunk-size 2000 was taken and every node's vector stood for its first ~500 tokens; a
    rebuild to a method with a smaller window (echo) kept the recorded size, and 14 of 15 nodes
    were embedded from their beginnings only, with one log line and exit 0."""
    from pipeline_helpers import long_doc

    write_docs(env / "src", {"long.txt": long_doc(200), "other.txt": long_doc(120, seed=2)})
    refused = runner.invoke(app, ["ingest", "src", "--index", "idx", "--chunk-size", "5000", "--json"])
    assert refused.exit_code == 2 and "more than the encoder's window holds" in refused.output
    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "400")  # fits htp's window, not echo's
    run_json("ingest", "src", "--index", "idx")
    stored = runner.invoke(app, ["rebuild", "--index", "idx", "--method", "echo", "--json"])
    assert stored.exit_code == 2 and "--source" in stored.output, stored.output
    assert "the longest has" in " ".join(stored.output.split())  # counted, not the recorded size
    assert run_json("info", "--index", "idx")["encoder"]["method"] == "htp"  # nothing switched
    monkeypatch.delenv("HTP_INDEX_CHUNK_SIZE")
    resplit = runner.invoke(app, ["rebuild", "--index", "idx", "--method", "echo", "--source", "src"])
    assert resplit.exit_code == 0 and "splitting at" in " ".join(resplit.output.split())
    info = run_json("info", "--index", "idx")
    assert info["encoder"]["method"] == "echo" and info["splitting"]["chunk_size"] < 400


def test_a_rebuild_to_another_k_counts_the_stored_nodes_not_the_recorded_chunk_size(env, monkeypatch):
    """An index split at the default size (the whole window) refused `rebuild --k 3`, which
    takes a few tokens of room, saying it "holds nodes of up to" that size: its nodes held 20.
    The nodes are counted now; the recorded size is capped at what the new encoder holds."""
    monkeypatch.delenv("HTP_INDEX_CHUNK_SIZE")  # the default: as large as the window
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    before = run_json("info", "--index", "idx")["splitting"]["chunk_size"]
    rebuilt = runner.invoke(app, ["rebuild", "--index", "idx", "--k", "3", "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    info = run_json("info", "--index", "idx")
    assert info["encoder"]["k"] == "3" and info["count"] == 3
    assert info["splitting"]["chunk_size"] < before  # later ingests split to fit the new window
    (env / "src" / "new.txt").write_text("the dog ran in the park.")
    assert run_json("ingest", "src", "--index", "idx")["added"] == 1


@pytest.mark.parametrize("method", ["htp", "echo"])
def test_a_max_length_too_small_for_the_smallest_node_names_the_first_one_that_fits(env, monkeypatch, method):
    """max_length 16 on smollm2-135m said "raise max_length by at least 39", but 55 was refused
    too: the shortfall came from a text budget clamped at 0."""
    import re

    write_docs(env / "src")
    monkeypatch.delenv("HTP_INDEX_CHUNK_SIZE")
    monkeypatch.setenv("HTP_INDEX_ENCODER__METHOD", method)
    monkeypatch.setenv("HTP_INDEX_ENCODER__MAX_LENGTH", "16")
    said = " ".join(run_json("ingest", "src", "--index", "idx", code=2)["error"].split())
    needed = 16 + int(re.search(r"raise max_length by at least (\d+)", said).group(1))
    monkeypatch.setenv("HTP_INDEX_ENCODER__MAX_LENGTH", str(needed - 1))
    run_json("ingest", "src", "--index", "idx", code=2)
    monkeypatch.setenv("HTP_INDEX_ENCODER__MAX_LENGTH", str(needed))
    run_json("ingest", "src", "--index", "idx")


def test_an_index_the_store_api_built_with_its_own_encoder_record_says_htp_index_cannot_embed_for_it(env):
    """A store created with {"model": "synthetic", "dim": 8} (as benchmarks/store_scale.py does):
    ingest said "invalid EncoderIdentity setting: model_fingerprint: Field required; ...", and a
    dense query asked for "the folder holding the same weights (None)"."""
    import numpy as np
    from llama_index.core.schema import TextNode

    from indexes import FaissVectorStore

    store = FaissVectorStore.create(env / "idx", dim=8, encoder={"model": "synthetic", "dim": 8}, use_gpu=False)
    store.add([TextNode(id_="n0", text="the cat sat", metadata={"doc_id": "d0"})],
              embeddings=np.ones((1, 8), dtype=np.float32))
    store.persist()
    write_docs(env / "src")
    for command in (["ingest", "src", "--keep-missing"], ["query", "the cat", "--mode", "dense"]):
        said = " ".join(run_json(*command, "--index", "idx", code=2)["error"].split())
        assert "its vectors were not written by an htp-index encoder" in said and "--mode sparse" in said, said
    assert run_json("query", "cat", "--index", "idx", "--mode", "sparse")["results"]


def test_a_rebuild_to_a_small_fixed_k_lays_the_stored_nodes_out_as_the_encoder_runs_them(env, monkeypatch):
    """`rebuild --k 1` over nodes of many short sentences was taken (exit 0) and cut 6 of 7
    nodes: their text tokens were compared with the text budget, which leaves out the two
    placeholders a fixed K adds per block. Each node is laid out now, and the rebuild refused."""
    monkeypatch.delenv("HTP_INDEX_CHUNK_SIZE")  # the default: as large as the window
    write_docs(env / "src", {"short.txt": " ".join(f"cat {i % 9} ran ." for i in range(400))})
    run_json("ingest", "src", "--index", "idx")
    refused = runner.invoke(app, ["rebuild", "--index", "idx", "--k", "1", "--json"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "holds untruncated" in said and "a larger --k" in said, said
    assert run_json("info", "--index", "idx")["encoder"]["k"] != "1"  # nothing switched


def test_an_index_recorded_with_a_max_length_past_the_models_positions_answers_and_names_its_rebuild(env, monkeypatch):
    """An older htp-index took max_length 9000 on smollm2-135m (8192 positions); once that was
    refused, such an index answered no dense or hybrid query, and ingest's advice ("use
    max_length <= 8192") was refused again as another encoder than the index's."""
    from indexes.spec import Manifest

    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    manifest = next((env / "idx" / "versions").glob("*/manifest.json"))
    record = json.loads(manifest.read_text())
    record["encoder"]["max_length"] = 600  # the tiny model has 512 positions
    manifest.write_text(json.dumps({**record, "checksum": Manifest.model_validate(record).body_checksum(record)}))
    assert run_json("query", "the cat", "--index", "idx", "--mode", "dense")["results"]
    (env / "src" / "new.txt").write_text("the dog ran in the park.")
    refused = runner.invoke(app, ["ingest", "src", "--index", "idx", "--json"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "`HTP_INDEX_ENCODER__MAX_LENGTH=512 htp-index rebuild --index idx`" in said, said
    monkeypatch.setenv("HTP_INDEX_ENCODER__MAX_LENGTH", "512")
    run_json("rebuild", "--index", "idx")
    monkeypatch.delenv("HTP_INDEX_ENCODER__MAX_LENGTH")
    assert run_json("ingest", "src", "--index", "idx")["added"] == 1


@pytest.mark.parametrize(("max_length", "said"), [("1000", "max_position_embeddings 512"),
                                                   ("16", "less than the smallest node")])
def test_a_max_length_the_model_or_the_smallest_node_cannot_take_is_refused(env, monkeypatch, max_length, said):
    """max_length 100000 on smollm2-135m (8192 positions) recorded chunk_size 99976 and embedded
    a 9,751-token node without a word; max_length 16 held nodes at the 32-token floor, which
    that window cannot hold (20 of 21 nodes cut)."""
    write_docs(env / "src")
    monkeypatch.delenv("HTP_INDEX_CHUNK_SIZE")
    monkeypatch.setenv("HTP_INDEX_ENCODER__MAX_LENGTH", max_length)
    refused = runner.invoke(app, ["ingest", "src", "--index", "idx", "--json"])
    output = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "max_length" in output and said in output, output


def test_htp_only_options_with_another_method_are_refused(env):
    """ingest --method vanilla --k 4 indexed without a word of K, which only HTP uses (as did
    --k on an index built with vanilla, and rebuild's --rewire-start, HTP's and TP's only)."""
    write_docs(env / "src")
    asked = runner.invoke(app, ["ingest", "src", "--index", "idx", "--method", "vanilla", "--k", "4", "--json"])
    assert asked.exit_code == 2 and "--k does not apply to method vanilla" in asked.output, asked.output
    assert not (env / "idx" / "CURRENT").exists()
    run_json("ingest", "src", "--index", "idx", "--method", "vanilla")
    recorded = runner.invoke(app, ["ingest", "src", "--index", "idx", "--k", "4"])
    assert recorded.exit_code == 2 and "--k does not apply to method vanilla" in recorded.output
    rewired = runner.invoke(app, ["rebuild", "--index", "idx", "--method", "last", "--rewire-start", "1"])
    assert rewired.exit_code == 2 and "--rewire-start does not apply to method last" in " ".join(rewired.output.split())


def test_an_ingest_counts_the_nodes_it_had_to_cut_to_the_encoders_window(env, monkeypatch):
    """Fixed K = 1 makes a block of every sentence; a node of many short sentences needs more
    placeholders than the window budgets, and its tail was cut with one log line, nothing in
    the run's figures."""
    write_docs(env / "src", {"short.txt": " ".join(["Cat sat."] * 300), "plain.txt": "the cat sat on the mat."})
    monkeypatch.setenv("HTP_INDEX_ENCODER__K", "1")
    monkeypatch.delenv("HTP_INDEX_CHUNK_SIZE")  # nodes that fill the window
    stats = run_json("ingest", "src", "--index", "idx")
    assert 0 < stats["nodes_truncated"] < stats["nodes_embedded"]
    assert "nodes truncated" in runner.invoke(app, ["ingest", "src", "--index", "idx2"]).output


def test_query_json_says_when_the_query_was_cut_to_the_encoder_window(env):
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    long_query = " ".join(["cat"] * 2000)  # far past the tiny model's window
    dense = run_json("query", long_query, "--index", "idx", "--mode", "dense")
    sparse = run_json("query", long_query, "--index", "idx", "--mode", "sparse")
    assert dense["results"] and len(dense["warnings"]) == 1
    assert "its vector stands for its beginning only" in dense["warnings"][0]
    assert sparse["warnings"] == []  # no vector to cut


def test_a_query_with_more_distinct_words_than_keyword_search_uses_or_none_says_so(env):
    """Keyword search uses a query's first 64 distinct words: a word past them was left out
    without a word (results [] and warnings []), and hybrid's warning said "used all of it".
    A query of stop words alone found nothing by keyword, also without a word."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    padded = " ".join(f"w{i}" for i in range(64)) + " cat"
    sparse = run_json("query", padded, "--index", "idx", "--mode", "sparse")
    assert sparse["warnings"] == ["keyword search used the query's first 64 distinct words; 1 more were left out"]
    assert run_json("query", "cat " * 70, "--index", "idx", "--mode", "sparse")["warnings"] == []  # one word
    assert run_json("query", padded, "--index", "idx", "--mode", "dense")["warnings"] == []
    shown = runner.invoke(app, ["query", padded, "--index", "idx", "--mode", "hybrid"])
    assert shown.exit_code == 0 and "1 more were left out" in " ".join(shown.output.split())
    for mode in ("sparse", "hybrid"):  # an empty keyword side is said too
        said = run_json("query", "the of and ?!", "--index", "idx", "--mode", mode)["warnings"]
        assert len(said) == 1 and said[0].startswith("the query has no keyword term")


def test_rebuild_keep_vectors_folds_the_keyword_postings_of_an_index_from_before_folding(env, monkeypatch):
    from indexes import keywords

    write_docs(env / "src", {"report.txt": "the \ufb01nancial report of the cat"})
    with monkeypatch.context() as before_folding:  # postings as htp-index wrote them before
        before_folding.setattr(keywords, "fold_text", lambda text: text)
        run_json("ingest", "src", "--index", "idx")
    assert run_json("query", "financial", "--index", "idx", "--mode", "sparse")["results"] == []
    run_json("rebuild", "--index", "idx", "--keep-vectors")
    assert [hit["doc_id"] for hit in run_json("query", "financial", "--index", "idx", "--mode", "sparse")["results"]] == [
        "report.txt"]


def test_query_refuses_an_empty_query_and_an_alpha_that_its_mode_would_ignore(env):
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    refused = runner.invoke(app, ["query", "the cat", "--index", "idx", "--mode", "dense", "--alpha", "0.5"])
    assert refused.exit_code == 2 and "fuses nothing" in refused.output  # a usage error
    for blank in ("", "   "):
        empty = runner.invoke(app, ["query", blank, "--index", "idx", "--mode", "sparse"])
        assert empty.exit_code == 2 and "the query is empty" in empty.output
    assert run_json("query", "the cat", "--index", "idx", "--mode", "hybrid", "--alpha", "0.5")["results"]


def test_a_list_value_such_as_tags_is_filtered_with_contains(env):
    (env / "src").mkdir()
    records = [{"_id": "p", "text": "the cat sat on the mat .", "metadata": {"tags": ["pets", "home"]}},
               {"_id": "w", "text": "the wolf ran in the woods .", "metadata": {"tags": ["wild"], "public": True}},
               {"_id": "n", "text": "the fish swam in the sea .", "metadata": {"year": 2020}}]
    (env / "src" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    run_json("ingest", "src", "--index", "idx")
    found = run_json("query", "animal", "--index", "idx", "-k", "3", "--filter", "tags~=pets")["results"]
    assert [hit["doc_id"] for hit in found] == ["c.jsonl#p"]
    others = run_json("query", "animal", "--index", "idx", "-k", "3", "--filter", "tags!=pets")["results"]
    assert len(others) == 3  # != compares the whole value, as = does: no list equals "pets"
    # a boolean: LlamaIndex's filters hold none (a traceback, exit 1); the store's true is 1
    public = run_json("query", "animal", "--index", "idx", "-k", "3", "--filter", "public=true")["results"]
    assert [hit["doc_id"] for hit in public] == ["c.jsonl#w"]
    mixed = runner.invoke(app, ["query", "animal", "--index", "idx", "--filter", 'tags~=[1, "a"]'])
    assert mixed.exit_code == 2 and "its value must be" in mixed.output and "Traceback" not in mixed.output


@pytest.mark.parametrize("spelling", ["bogus", "thread=abc", "thread=0", "dask=0", "dask=", "dask=-1", "dask=abc",
                                      "dask=2.5", "dask=+2"])
def test_a_misspelled_task_runner_is_a_usage_error_before_any_work(tmp_path, spelling):
    """It was a ValueError from inside the run: exit 1, 'the run failed', after the plan ran."""
    for command in (["ingest", str(tmp_path)], ["rebuild"]):
        result = runner.invoke(app, [*command, "--index", str(tmp_path / "idx"), "--task-runner", spelling])
        assert result.exit_code == 2 and "--task-runner" in result.output
    assert not (tmp_path / "idx").exists()


def test_a_torch_thread_count_that_is_no_number_is_a_usage_error_before_the_flow(tmp_path, monkeypatch):
    """HTP_TORCH_THREADS=four failed each embedding task as a bare int() error, retried twice
    (46 s), exit 1; it is named now, before a flow starts (exit 2)."""
    import flows.ingest
    import flows.rebuild

    def started(*args, **kwargs):
        raise AssertionError("the flow started")

    monkeypatch.setattr(flows.ingest, "ingest_flow", started)
    monkeypatch.setattr(flows.rebuild, "rebuild_flow", started)
    monkeypatch.setenv("HTP_TORCH_THREADS", "four")
    src = write_docs(tmp_path / "src")
    for command in (["ingest", str(src)], ["rebuild"]):
        result = runner.invoke(app, [*command, "--index", str(tmp_path / "idx"), "--task-runner", "thread", "--json"])
        failure = json.loads(result.stdout)
        assert (result.exit_code, failure["exit_code"]) == (2, 2), result.output
        assert "HTP_TORCH_THREADS='four' is not a number" in failure["error"]


@pytest.mark.parametrize(("flag", "value"), [("--cron", "not a cron"), ("--cron", "61 * * * *"),
                                             ("--interval", "0"), ("--interval", "-5"), ("--interval", "nan"),
                                             ("--interval", "inf"), ("--interval", "0.001")])
def test_a_cadence_prefect_would_refuse_or_run_every_millisecond_is_a_usage_error(tmp_path, flag, value):
    result = runner.invoke(app, ["schedule", str(tmp_path), "--index", str(tmp_path / "idx"), flag, value])
    assert result.exit_code == 2 and flag in result.output


def test_a_schedule_without_a_prefect_server_is_a_usage_error_before_the_settings_are_read(tmp_path, monkeypatch):
    """It exited 1 ~13 s in, after the flows and the settings were loaded, though it fails
    again unchanged until PREFECT_API_URL is set."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import htp_cli.main

    def read(*args, **kwargs):
        raise AssertionError("the settings were read")

    monkeypatch.setattr(htp_cli.main, "_settings", read)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(app, ["schedule", str(tmp_path), "--index", str(tmp_path / "idx"), "--interval", "20"])
    assert result.exit_code == 2 and "schedules need a Prefect server" in result.output, result.output


def test_a_schedule_with_no_prefect_server_answering_its_url_is_a_usage_error_at_once(tmp_path):
    """PREFECT_API_URL naming a port where nothing listens logged "serving deployment" and failed
    ~20 s in with "All connection attempts failed", exit 1."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as free:  # bound, not listening: a connection is refused
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}/api"
        with temporary_settings(updates={PREFECT_API_URL: url}):
            result = runner.invoke(app, ["schedule", str(tmp_path), "--index", str(tmp_path / "idx"), "--interval", "20"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"none answers at PREFECT_API_URL={url}" in said, result.output


def test_usage_errors_found_late_exit_2_and_a_mistyped_index_leaves_no_folder(env):
    """An exit layer past the model's depth, an index kind FAISS cannot parse, an overlap over
    a quarter of the node, a device torch does not know and rewire bounds the wrong way round
    exited 1 (a failed run, as if a retry could pass), some with a raw pydantic or torch dump;
    compact, restore and migrate given a mistyped --index made the folder, holding only a lock."""
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    (env / "overlap.toml").write_text("chunk_size = 100\nchunk_overlap = 60\n")
    for args, said in [
        (["rebuild", "--index", "idx", "--exit-layer", "99"], "exit_layer=99 is outside"),
        (["ingest", "src", "--index", "new", "--index-kind", "bogus"], "index_kind 'bogus' is neither"),
        (["ingest", "src", "--index", "new2", "--config", "overlap.toml"], "chunk_overlap 60 is more than 1/4"),
        (["query", "cat", "--index", "idx", "--device", "bogus"], "device 'bogus' is not one of"),
        (["rebuild", "--index", "idx", "--rewire-start", "5", "--rewire-stop", "2"], "rewire_stop must be >= rewire_start"),
        (["compact", "--index", "nx"], "no index at nx"),
        (["restore", "--index", "nx", "--version", "1"], "no index at nx"),
        (["migrate", "--index", "nx"], "no index at nx"),
        (["verify", "--index", "idx", "--version", "99"], "does not keep version 99"),
        (["info", "--index", "src/cats.txt"], "no index at src/cats.txt"),
        (["ingest", "src", "--index", "src/cats.txt"], "is a file, not an index folder"),
        (["ingest", "src", "--index", "src/cats.txt/idx"], "src/cats.txt is a file, not a folder"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert said in " ".join(result.output.split()), (args, result.output)
        assert "input_value" not in result.output and "Traceback" not in result.output
    assert not (env / "nx").exists()


def test_info_reads_the_index_whatever_this_folders_settings_say(env, monkeypatch):
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    monkeypatch.setenv("HTP_INDEX_ALPHA", "5")  # invalid: info takes no settings, so it goes on
    info = run_json("info", "--index", "idx")
    assert info["count"] == 3 and "settings are invalid" in info["forward_pass"]
    monkeypatch.delenv("HTP_INDEX_ALPHA")
    shown = runner.invoke(app, ["info", "--index", "idx"])
    assert "no vector correction yet" in shown.output and "--keep-vectors" not in shown.output  # 3 < 8 nodes


def test_info_folds_a_value_longer_than_the_terminal_instead_of_cutting_it(env, monkeypatch):
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    fingerprint = run_json("info", "--index", "idx")["encoder"]["model_fingerprint"]
    monkeypatch.setenv("COLUMNS", "60")
    shown = runner.invoke(app, ["info", "--index", "idx"]).output
    assert "…" not in shown
    cells = "".join(line.split("│")[2].strip() for line in shown.splitlines() if line.count("│") == 3)
    assert fingerprint in cells


def test_verify_and_migrate_answer_json_on_stdout(env):
    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    assert run_json("migrate", "--index", "idx") == {"ok": True, "migrated": False, "version": None}
    assert run_json("verify", "--index", "idx")["ok"] is True
    failed = run_json("verify", "--index", "idx", "--version", "99", code=2)
    assert failed["ok"] is False and "does not keep version 99" in failed["error"]


@pytest.mark.parametrize("option", [["--port", "99999"], ["--port", "-1"], ["--reload-interval", "-1"]])
def test_serve_refuses_a_port_or_interval_out_of_range_before_loading_anything(env, option):
    result = runner.invoke(app, ["serve", "--index", "idx", *option])
    assert result.exit_code == 2, result.output


def test_every_command_points_at_a_missing_index_with_the_command_that_creates_one(env):
    """info, compact, migrate (and restore, verify) said "create one with FaissVectorStore.create(...)
    or ...", a Python API, where query gave the command; Python callers keep that wording."""
    from indexes.errors import IndexNotFoundError

    hint = "no index at nosuch; create one with: htp-index ingest SOURCE --index nosuch"
    for args in (["info"], ["compact"], ["migrate"], ["verify"], ["restore", "--version", "1"], ["query", "cat"]):
        failure = run_json(*args, "-i", "nosuch", code=2)
        assert failure["error"] == hint, (args, failure)
    assert "FaissVectorStore.create" in str(IndexNotFoundError.at("nosuch"))


def test_a_failed_command_with_json_says_so_on_stdout(env):
    """A script that reads --json from stdout got nothing to parse when a command failed."""
    result = runner.invoke(app, ["query", "x", "--index", "nowhere", "--json"])
    assert result.exit_code == 2
    failed = json.loads(result.stdout)
    assert failed["ok"] is False and failed["exit_code"] == 2 and "no index at nowhere" in failed["error"]


@pytest.mark.parametrize("args", [
    ["query", "hi", "--index", "{idx}", "--filter", "nokey", "--json"],  # typer.BadParameter in the command
    ["ingest", "{src}", "--index", "{idx}", "--chunk-size", "10", "--json"],  # a setting out of range
    ["query", "hi", "--index", "{idx}", "-k", "0", "--json"],  # Click's own range check
    ["eval", "{src}", "--split", "test", "--method", "bm25", "--mode", "sparse", "--json"],
])
def test_json_commands_print_their_usage_errors_on_stdout_too(tmp_path, args):
    # each printed only the help box on stderr: a script parsing stdout got nothing
    src = write_docs(tmp_path / "src")
    result = CliRunner().invoke(app, [a.format(src=src, idx=tmp_path / "idx") for a in args])
    assert result.exit_code == 2, result.output
    failure = json.loads(result.stdout.strip().splitlines()[-1])
    assert failure["ok"] is False and failure["exit_code"] == 2 and failure["error"]


def test_serve_says_a_port_in_use_at_once_and_not_with_uvicorn_s_exit_code_3(env):
    """uvicorn bound the port after the index and model had loaded, and exited 3 (htp-index's
    code for "some documents failed") with its own log line; the port is now bound first."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = runner.invoke(app, ["serve", "--index", "idx", "--port", str(port)])
    assert failed.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}: the port is in use" in failed.output
    # an address this machine does not have fails again unchanged: bad usage
    failed = runner.invoke(app, ["serve", "--index", "idx", "--host", "192.0.2.1", "--port", "0"])
    assert failed.exit_code == 2 and "cannot listen on 192.0.2.1:0" in failed.output


def test_serve_answers_on_the_socket_it_bound_first(env):
    """The service runs on the socket bound before loading (port 0: the log names the port)."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request

    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    server = subprocess.Popen([sys.executable, "-m", "htp_cli", "serve", "--index", "idx", "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            assert line or server.poll() is None, "serve exited"
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        assert port, "serve never said where it listens"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert json.loads(response.read())["status"] == "ok"
                    break
            except OSError:
                time.sleep(0.2)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/query", data=b'{"query": "cat", "top_k": 2}',
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert len(json.loads(response.read())["results"]) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_index_at_a_path_too_long_for_sqlite_is_named_as_such(env):
    """SQLite opens files by paths of at most 504 bytes: an index copied deep into folders was
    refused as "unable to open database file" (exit 1; info and verify said ok), and an ingest
    there blamed a full disk."""
    import shutil

    write_docs(env / "src")
    run_json("ingest", "src", "--index", "idx")
    deep = env / ("d" * 200) / ("e" * 200) / ("f" * 40)
    deep.mkdir(parents=True)
    shutil.copytree(env / "idx", deep / "idx")
    failed = run_json("query", "cat", "--index", str(deep / "idx"), "--mode", "sparse", code=2)
    assert "SQLite opens files by paths of at most 504 bytes" in failed["error"]
    room = int(failed["error"].split("absolute path is at most ")[1].split()[0])
    assert room == 504 - len("/segments/seg-000000000000-00000000/nodes.sqlite")
    failed = run_json("ingest", "src", "--index", str(deep / "new"), code=2)
    assert "SQLite opens files by paths of at most 504 bytes" in failed["error"]
    assert not list((deep / "new").glob("segments/*/nodes.sqlite"))  # nothing half-written
