"""Flow workers embed with the index's encoder even where the index is not (remote Dask workers).

The bug this guards against: the embed task used to read the index manifest on the worker and,
where the index path did not exist there, fell back to the default encoder, so an index built
with another method silently got vectors of the wrong kind (the apply step only checked their
dimension).
"""

from __future__ import annotations

import numpy as np
import pytest
from llama_index.core.schema import TextNode
from pipeline_helpers import DOCS, write_docs

from flows.runtime import embed_batch_task
from htp_embed import EncoderConfig
from indexes import EncoderMismatchError, FaissVectorStore
from pipelines.engine import IndexSession
from pipelines.ingest import ingest
from pipelines.settings import Settings


@pytest.fixture()
def vanilla_index(tiny_model_dir, tmp_path):
    encoder = EncoderConfig(model=str(tiny_model_dir), method="vanilla", segmenter="sentencizer", show_progress=False)
    settings = Settings(encoder=encoder, chunk_size=48, chunk_overlap=0)
    ingest(write_docs(tmp_path / "src"), tmp_path / "idx", settings)
    return tmp_path / "idx"


def flow_settings(tiny_model_dir) -> Settings:
    """A flow's own settings: they do not name the method, so the index's manifest decides."""
    return Settings(encoder=EncoderConfig(model=str(tiny_model_dir), segmenter="sentencizer", show_progress=False),
                    chunk_size=48, chunk_overlap=0)


def test_a_worker_without_the_index_embeds_with_the_index_encoder(vanilla_index, tiny_model_dir, tmp_path, monkeypatch):
    with IndexSession.open(vanilla_index, flow_settings(tiny_model_dir)) as session:
        shipped = session.settings.encoder  # what the flow sends every worker
    assert shipped.method == "vanilla"
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker's machine: no index here, not even the path
    batch = [TextNode(id_="n0", text=DOCS["sea.md"], metadata={"doc_id": "sea.md"},
                      excluded_embed_metadata_keys=["doc_id"])]
    embedded = embed_batch_task.fn(batch, shipped)
    assert embedded.errors == {} and embedded.identity["method"] == "vanilla"
    assert embedded.identity == FaissVectorStore.open(vanilla_index).encoder
    stored = dict(FaissVectorStore.open(vanilla_index).iter_embeddings())
    sea = next(node_id for node_id in stored if node_id.startswith("sea.md"))
    assert np.allclose(embedded.vectors[0], stored[sea], atol=1e-5)


def test_apply_refuses_vectors_from_another_encoder(vanilla_index, tiny_model_dir, tmp_path):
    write_docs(tmp_path / "src", {**DOCS, "new.txt": "the sun rose over the hill ."})
    htp = EncoderConfig(model=str(tiny_model_dir), method="htp", segmenter="sentencizer", show_progress=False)
    version = FaissVectorStore.current_version(vanilla_index)
    with IndexSession.open(vanilla_index, flow_settings(tiny_model_dir)) as session:
        plan = session.plan(tmp_path / "src")
        split = session.split(plan.to_embed)
        assert split.total_nodes == 1
        wrong = [embed_batch_task.fn(batch, htp) for batch in split.batches(8)]
        with pytest.raises(EncoderMismatchError):
            session.apply(plan, split, wrong)
    assert FaissVectorStore.current_version(vanilla_index) == version
    assert "new.txt" not in FaissVectorStore.open(vanilla_index).doc_hashes()
