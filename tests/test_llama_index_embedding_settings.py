"""HTPEmbedding's serialised form names everything that decides its vectors, and rebuilds it:
LlamaIndex's IngestionCache keys on ``to_dict()``, and its workers get the embedding pickled."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from llama_index.core import Document
from llama_index.core.callbacks import CallbackManager
from llama_index.core.ingestion import IngestionCache, IngestionPipeline
from tiny_decoder import build_model, build_tokenizer, tiny_encoder

from htp_embed.llama_index import HTPEmbedding

TEXTS = ["the cat sat on the mat .", "fish swam in the sea ."]


def embedding(folder, **settings) -> HTPEmbedding:
    base = {"dtype": "float32", "segmenter": "sentencizer", "show_progress": False}
    return HTPEmbedding(model=str(folder), **{**base, **settings})


@pytest.fixture(scope="module")
def other_weights_dir(tmp_path_factory):
    """The tiny decoder's architecture and tokenizer with other weights."""
    path = tmp_path_factory.mktemp("tiny-other")
    tokenizer = build_tokenizer("right")
    build_model(len(tokenizer), seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_to_dict_differs_for_every_setting_that_changes_vectors(tiny_model_dir, other_weights_dir):
    default = embedding(tiny_model_dir).to_dict()
    assert embedding(tiny_model_dir, max_length=64).to_dict() != default
    assert embedding(tiny_model_dir, dtype="bfloat16").to_dict() != default
    assert (
        embedding(other_weights_dir).to_dict()["encoder_identity"]["model_fingerprint"]
        != (default["encoder_identity"]["model_fingerprint"])
    )


def test_a_shared_ingestion_cache_does_not_hand_one_embeddings_vectors_to_another(tiny_model_dir):
    cache = IngestionCache()
    first, second = embedding(tiny_model_dir), embedding(tiny_model_dir, dtype="bfloat16")
    IngestionPipeline(transformations=[first], cache=cache).run(
        documents=[Document(text=t) for t in TEXTS]
    )
    nodes = IngestionPipeline(transformations=[second], cache=cache).run(
        documents=[Document(text=t) for t in TEXTS]
    )
    np.testing.assert_allclose(
        [n.embedding for n in nodes], second.get_text_embedding_batch(TEXTS), atol=1e-6
    )


def test_base_embedding_fields_go_to_the_base_class(tiny_model_dir):
    manager = CallbackManager([])
    built = embedding(tiny_model_dir, callback_manager=manager, num_workers=2)
    assert built.callback_manager is manager and built.num_workers == 2


@pytest.mark.parametrize("way", ["pickle", "from_dict", "from_json", "deepcopy"])
def test_a_copy_is_the_same_embedding(tiny_model_dir, way):
    original = embedding(tiny_model_dir, max_length=64, num_workers=2, embed_batch_size=3)
    copied = {
        "pickle": lambda: pickle.loads(pickle.dumps(original)),
        "from_dict": lambda: HTPEmbedding.from_dict(original.to_dict()),
        "from_json": lambda: HTPEmbedding.from_json(original.to_json()),
        "deepcopy": lambda: copy.deepcopy(original),
    }[way]()
    assert copied.to_dict() == original.to_dict()
    np.testing.assert_allclose(
        copied.get_text_embedding_batch(TEXTS), original.get_text_embedding_batch(TEXTS), atol=1e-6
    )


def test_an_embedding_over_an_in_memory_decoder_refuses_to_pickle_by_name():
    with pytest.raises(ValueError, match="HTPEmbedding cannot be rebuilt"):
        pickle.loads(pickle.dumps(HTPEmbedding(tiny_encoder(k=1))))


def test_a_batch_size_of_zero_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="embed_batch_size"):
        embedding(tiny_model_dir, embed_batch_size=0)


@pytest.mark.parametrize("text", ["\u200b", "\x00\x01", "\ufeff \u200d"])
def test_a_text_of_only_invisible_characters_is_refused(text):
    built = HTPEmbedding(tiny_encoder(k=1))
    with pytest.raises(ValueError, match="only invisible characters"):
        built.get_text_embedding(text)
    with pytest.raises(ValueError, match="only invisible characters"):
        built.get_query_embedding(text)


def test_a_lone_surrogate_is_refused_clearly():
    built = HTPEmbedding(tiny_encoder(k=1))
    with pytest.raises(ValueError, match=r"lone surrogate \('\\ud800'\) at character 4"):
        built.get_text_embedding("the \ud800 cat")
