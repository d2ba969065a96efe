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

from flows.ingest import apply_task, embed_batch_task
from htp_embed import EncoderConfig
from indexes import EncoderMismatchError, FaissVectorStore
from pipelines.index_access import encoder_settings_for
from pipelines.ingest import ingest, plan_ingest
from pipelines.settings import Settings
from pipelines.sources import iter_source


@pytest.fixture()
def vanilla_index(tiny_model_dir, tmp_path):
    encoder = EncoderConfig(model=str(tiny_model_dir), method="vanilla", segmenter="sentencizer", show_progress=False)
    settings = Settings(encoder=encoder, chunk_size=48, chunk_overlap=0)
    ingest(write_docs(tmp_path / "src"), tmp_path / "idx", settings)
    return tmp_path / "idx"


def test_a_worker_without_the_index_embeds_with_the_index_encoder(vanilla_index, tiny_model_dir, tmp_path, monkeypatch):
    # The flow's own settings do not name the method: the index's manifest decides.
    flow_settings = Settings(encoder=EncoderConfig(model=str(tiny_model_dir), segmenter="sentencizer",
                                                   show_progress=False))
    shipped = encoder_settings_for(vanilla_index, flow_settings).model_dump(mode="json")
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker's machine: no index here, not even the path
    batch = [TextNode(id_="n0", text=DOCS["sea.md"], metadata={"doc_id": "sea.md"},
                      excluded_embed_metadata_keys=["doc_id"])]
    embedded, errors, identity = embed_batch_task.fn(batch, shipped)
    assert errors == {} and identity["method"] == "vanilla"
    assert identity == FaissVectorStore.open(vanilla_index).encoder
    stored = dict(FaissVectorStore.open(vanilla_index).iter_embeddings())
    sea = next(node_id for node_id in stored if node_id.startswith("sea.md"))
    assert np.allclose(embedded[0].embedding, stored[sea], atol=1e-5)


def test_apply_refuses_vectors_from_another_encoder(vanilla_index, tiny_model_dir, tmp_path):
    settings = Settings(encoder=EncoderConfig(model=str(tiny_model_dir), segmenter="sentencizer",
                                              show_progress=False), chunk_size=48, chunk_overlap=0)
    transport = settings.to_transport()
    write_docs(tmp_path / "src", {**DOCS, "new.txt": "the sun rose over the hill ."})
    plan = plan_ingest(iter_source(tmp_path / "src"), FaissVectorStore.open(vanilla_index).doc_hashes())
    htp = EncoderConfig(model=str(tiny_model_dir), method="htp", segmenter="sentencizer", show_progress=False)
    batch = [TextNode(id_="new.txt#0", text="the sun rose over the hill .", metadata={"doc_id": "new.txt"})]
    embedded, _, wrong = embed_batch_task.fn(batch, htp.model_dump(mode="json"))
    version = FaissVectorStore.current_version(vanilla_index)
    with pytest.raises(EncoderMismatchError):
        apply_task.fn(plan, embedded, {}, [wrong], str(vanilla_index), transport)
    assert FaissVectorStore.current_version(vanilla_index) == version
