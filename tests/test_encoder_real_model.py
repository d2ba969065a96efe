"""End to end with the real offline models (converted once into the user cache)."""

from __future__ import annotations

import numpy as np
import pytest

from htp_embed import HTPEncoder

pytestmark = pytest.mark.slow

TEXTS = [
    "Mitochondria produce most of the cell's ATP through oxidative phosphorylation. "
    "The electron transport chain pumps protons across the inner membrane.",
    "Cellular respiration in the mitochondrion generates adenosine triphosphate, the energy "
    "currency of the cell, using a proton gradient.",
    "The football match ended in a draw after extra time. Fans left the stadium in the rain.",
]


@pytest.fixture(scope="module")
def gemma() -> HTPEncoder:
    return HTPEncoder(show_progress=False)


@pytest.mark.parametrize("method", ["htp", "vanilla"])
def test_default_model_puts_the_related_pair_closest(gemma, method):
    encoder = gemma if method == "htp" else gemma.with_method(method)
    vectors = encoder.encode_documents(TEXTS)
    assert vectors.shape == (3, 640) and vectors.dtype == np.float32
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[1, 2]


def test_default_model_query_finds_its_document(gemma):
    query = gemma.encode_queries(["How do cells make ATP?"])
    scores = (gemma.encode_documents(TEXTS) @ query.T).ravel()
    assert int(scores.argmax()) in (0, 1)  # a mitochondria text, not the football match


def test_default_model_layers_resolve_to_the_documented_defaults(gemma):
    assert gemma.exit_depth == 13  # of 18: the best exit measured (layer_defaults.py)
    assert gemma.rewire_layers == range(1, 7)


def test_smollm2_loads_and_embeds():
    encoder = HTPEncoder(model="smollm2-135m", show_progress=False)
    vectors = encoder.encode_documents(TEXTS)
    assert vectors.shape == (3, 576)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]
