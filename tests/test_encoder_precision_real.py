"""bfloat16 keeps the real model's vectors: the quality guard of dtype 'auto' (issue 21).

'auto' may choose bfloat16 on a CPU where it measures faster; these vectors must stay at
cosine >= 0.999 to the float32 reference, for documents and for short queries alike.
"""

from __future__ import annotations

import numpy as np
import pytest

from htp_embed import HTPEncoder

pytestmark = pytest.mark.slow

DOCUMENTS = [
    "Mitochondria produce most of the cell's ATP through oxidative phosphorylation. "
    "The electron transport chain pumps protons across the inner membrane.",
    "The football match ended in a draw after extra time. Fans left the stadium in the rain.",
    "Aspirin irreversibly inhibits cyclooxygenase, reducing thromboxane synthesis in platelets; "
    "low doses lower the risk of myocardial infarction in some patients.",
]
QUERIES = ["how do cells make energy?", "BRCA1 mutations and breast cancer risk", "who won the match"]


@pytest.mark.parametrize("method", ["htp", "vanilla"])
def test_bfloat16_vectors_stay_within_cosine_0999_of_float32(method):
    exact = HTPEncoder(dtype="float32", method=method, show_progress=False)
    fast = exact.with_method(method, dtype="bfloat16")
    for encode in ("encode_documents", "encode_queries"):
        texts = DOCUMENTS if encode == "encode_documents" else QUERIES
        a, b = getattr(exact, encode)(texts), getattr(fast, encode)(texts)
        cosines = (a * b).sum(axis=1)
        assert cosines.min() >= 0.999, (encode, cosines)
        assert np.isfinite(b).all()
