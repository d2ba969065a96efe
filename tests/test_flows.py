"""Prefect flows: a real flow run (test harness), and a scheduled deployment against a real
`prefect server start` on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pipeline_helpers import settings_for, write_docs

from flows import runtime
from flows.ingest import ingest_flow
from flows.schedule import deployment_name, ingest_deployment_kwargs

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def settings(embedding, monkeypatch):
    settings = settings_for(embedding, nodes_per_batch=1)
    # the flow's workers find the model already loaded, as a long-lived worker would
    monkeypatch.setitem(runtime._ENCODERS, settings.encoder.model_dump_json(), embedding.encoder)
    return settings


def test_ingest_flow_runs_tasks_and_is_incremental(harness, tmp_path, settings):
    from prefect.client.orchestration import get_client

    source = write_docs(tmp_path / "src")
    stats = ingest_flow(str(source), str(tmp_path / "idx"), settings.model_dump(mode="json"))
    assert stats["added"] == 3 and stats["nodes_embedded"] == 3 and stats["failed"] == 0
    again = ingest_flow(str(source), str(tmp_path / "idx"), settings.model_dump(mode="json"))
    assert again["nodes_embedded"] == 0 and again["unchanged"] == 3

    async def task_names():
        async with get_client() as client:
            runs = await client.read_task_runs()
            return [run.name for run in runs]

    import asyncio

    names = asyncio.run(task_names())
    assert sum(name.startswith("embed-batch") for name in names) >= 3  # one task per batch
    assert any(name.startswith("apply-and-persist") for name in names)


def test_ingest_flow_publishes_a_stats_artifact(harness, tmp_path, settings):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.runtime import artifact_key

    two_docs = {"a.txt": "the cat sat .", "b.txt": "fish swam ."}
    source = write_docs(tmp_path / "src", two_docs)
    ingest_flow(str(source), str(tmp_path / "idx"), settings.model_dump(mode="json"))
    ingest_flow(str(source), str(tmp_path / "other" / "idx"), settings.model_dump(mode="json"))

    async def artifacts(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    # each index its own series: the second index's run is not the first one's latest
    key, other = artifact_key("ingest", str(tmp_path / "idx")), artifact_key("ingest", str(tmp_path / "other" / "idx"))
    assert key != other and key.startswith("ingest-stats-idx-")
    found, found_other = asyncio.run(artifacts(key)), asyncio.run(artifacts(other))
    assert len(found) == len(found_other) == 1
    assert "| added | 2 |" in found[0].data and str(tmp_path / "idx") in found[0].data


def test_a_step_is_retried_for_passing_trouble_not_for_an_error_about_the_request():
    from prefect.states import Failed

    from flows.runtime import worth_retrying
    from indexes import IndexNotFoundError
    from pipelines.errors import SplittingMismatchError

    assert worth_retrying(None, None, Failed(data=OSError("the share is not mounted yet")))
    assert worth_retrying(None, None, Failed(data=FileNotFoundError("a file being copied")))
    assert not worth_retrying(None, None, Failed(data=SplittingMismatchError("another chunk size")))
    assert not worth_retrying(None, None, Failed(data=IndexNotFoundError("no index to rebuild")))


def test_deployment_runs_one_at_a_time_without_a_server_slot_a_killed_run_could_keep(tmp_path, settings):
    kwargs = ingest_deployment_kwargs(tmp_path / "src", tmp_path / "idx", settings, cron="0 3 * * *")
    assert kwargs["limit"] == 1 and kwargs["cron"] == "0 3 * * *"
    assert "global_limit" not in kwargs  # held forever by a run whose process was killed
    assert kwargs["name"] == deployment_name(tmp_path / "idx")
    assert kwargs["parameters"]["settings"]["encoder"]["model"] == settings.encoder.model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_scheduled_deployment_runs_on_a_real_server(tmp_path, tiny_model_dir):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "HTP_INDEX_ENCODER__MODEL": str(tiny_model_dir),
        "HTP_INDEX_ENCODER__SEGMENTER": "sentencizer",
        "HTP_INDEX_CHUNK_SIZE": "48",
    }
    prefect = Path(sys.executable).with_name("prefect")
    htp_index = Path(sys.executable).with_name("htp-index")
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    worker = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("prefect server did not become healthy within 120 s")
        source = write_docs(tmp_path / "src")
        index = tmp_path / "idx"
        worker = subprocess.Popen([str(htp_index), "schedule", str(source), "--index", str(index), "--interval", "5"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 150
        completed = []
        while time.time() < deadline and not completed:
            time.sleep(3)
            response = httpx.post(f"http://127.0.0.1:{port}/api/flow_runs/filter",
                                  json={"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}, timeout=10)
            completed = [run for run in response.json() if run.get("deployment_id")]
        assert completed, "no scheduled run completed within 150 s"
        from indexes import FaissVectorStore

        assert FaissVectorStore.read_manifest(index).count == 3
        # htp-index's own lines are in the run's log: a served run's process had no logging
        # configured, so the plan's counts and any wait for a busy index were never seen
        # (Prefect ships a run's log lines in batches, some after the run reports completed)
        deadline, logs = time.time() + 60, []
        while time.time() < deadline and not any("pipelines.engine: plan:" in line["message"] for line in logs):
            time.sleep(2)
            logs = httpx.post(f"http://127.0.0.1:{port}/api/logs/filter",
                              json={"logs": {"flow_run_id": {"any_": [completed[0]["id"]]}}}, timeout=10).json()
        assert any("pipelines.engine: plan:" in line["message"] for line in logs), [line["message"] for line in logs]
    finally:
        for process in (worker, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


def test_rebuild_flow_switches_the_encoder(harness, tmp_path, settings, embedding, monkeypatch):
    from flows.rebuild import rebuild_flow
    from htp_embed import EncoderConfig
    from indexes import FaissVectorStore

    source = write_docs(tmp_path / "src")
    ingest_flow(str(source), str(tmp_path / "idx"), settings.model_dump(mode="json"))
    before = FaissVectorStore.current_version(tmp_path / "idx")
    target = EncoderConfig(**{**settings.encoder.model_dump(), "method": "vanilla"})
    monkeypatch.setitem(runtime._ENCODERS, target.model_dump_json(), embedding.encoder.with_method("vanilla"))
    stats = rebuild_flow(str(tmp_path / "idx"), settings.model_dump(mode="json"), encoder_overrides={"method": "vanilla"})
    assert stats["nodes_embedded"] == 3 and stats["failed"] == 0 and stats["version"] > before
    assert FaissVectorStore.read_manifest(tmp_path / "idx").encoder["method"] == "vanilla"


def test_a_flow_run_keeps_the_encoder_the_index_was_built_with(harness, tiny_model_dir, tmp_path, monkeypatch):
    """Through the command, as a user runs it: an index built with method=vanilla takes a flow
    ingest that does not name a method (defaults are not choices)."""
    import json

    from typer.testing import CliRunner

    from htp_cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTP_INDEX_ENCODER__MODEL", str(tiny_model_dir))
    monkeypatch.setenv("HTP_INDEX_ENCODER__SEGMENTER", "sentencizer")
    monkeypatch.setenv("HTP_INDEX_CHUNK_SIZE", "64")
    source = write_docs(tmp_path / "src")
    runner = CliRunner()
    built = runner.invoke(app, ["ingest", str(source), "--index", "idx", "--method", "vanilla", "--json"])
    assert built.exit_code == 0, built.output
    (source / "more.txt").write_text("the dog ran home .")
    flowed = runner.invoke(app, ["ingest", str(source), "--index", "idx", "--task-runner", "thread", "--json"])
    assert flowed.exit_code == 0, flowed.output
    assert json.loads(flowed.stdout)["added"] == 1
    info = json.loads(runner.invoke(app, ["info", "--index", "idx", "--json"]).stdout)
    assert info["encoder"]["method"] == "vanilla" and info["count"] == 4


def test_a_flow_run_with_failed_documents_ends_partial_and_still_returns_its_stats(harness, tmp_path, settings):
    """The command line exits 3 when documents fail; the flow run is then Completed with the
    name Partial (a plain Completed showed a good run in the UI and in automations)."""
    from flows.ingest import ingest_flow_body

    source = write_docs(tmp_path / "src")
    (source / "bad.txt").write_bytes(b"\xff\xfe\x00garbage\xff")
    state = ingest_flow_body(str(source), str(tmp_path / "idx"), settings.to_transport(), return_state=True)
    assert state.is_completed() and state.name == "Partial" and "bad.txt" in state.message
    stats = state.result()
    assert stats["failed"] == 1 and stats["added"] == 3
    again = ingest_flow(str(source), str(tmp_path / "idx"), settings.to_transport())
    assert again["failed"] == 1 and again["unchanged"] == 3  # the plain call still gets the stats


@pytest.fixture()
def answering_server():
    """A local web server answering every GET with the status and body it is given."""
    import http.server
    import threading

    servers = []

    def start(status: int, body: bytes) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_schedule_url_that_is_no_prefect_api_is_refused_naming_the_fix(answering_server):
    # PREFECT_API_URL without /api (a server's 404) or another web server (501) logged "serving
    # deployment" and failed ~6 s later with "Client error '404 Not Found'", exit 1
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.schedule import NoPrefectServerError, require_prefect_server
    from htp_cli.failure import is_usage_error

    url = answering_server(404, b'{"detail":"Not Found"}')
    with temporary_settings(updates={PREFECT_API_URL: url}), pytest.raises(NoPrefectServerError) as caught:
        require_prefect_server()
    message = str(caught.value)
    assert f"PREFECT_API_URL={url} is not a Prefect server's API" in message and "404" in message
    assert f"PREFECT_API_URL={url}/api" in message and is_usage_error(caught.value)
    healthy = answering_server(200, b"true") + "/api"
    with temporary_settings(updates={PREFECT_API_URL: healthy}):
        require_prefect_server()
