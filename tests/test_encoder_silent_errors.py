"""Encoder paths that used to be silently wrong: a caller's decoder reported (and cached) with
the fingerprint of the weights on disk, a decoder or tokenizer passed alone and dropped,
``with_method`` sharing weights across a model override, NaN vectors returned (found by an
audit; each test failed before its fix)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_decoder import build_model, build_tokenizer

from htp_embed import HTPEncoder, NonFiniteVectorsError
from htp_embed import fingerprint as fp

TEXT = "The Cat sat on the mat . the dog ran in the park ! a bird sang"


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny model directory, with a fresh cache (fingerprints.json)."""
    monkeypatch.setenv("HTP_INDEX_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _encoder(model: Path, **settings) -> HTPEncoder:
    return HTPEncoder(model=str(model), segmenter="sentencizer", show_progress=False, **settings)


def _tuned_copy(model: Path) -> tuple[torch.nn.Module, object]:
    """The directory's model loaded by the caller and changed in memory (a fine-tune in
    process), with its tokenizer: what a user passes as ``HTPEncoder(decoder=, tokenizer=)``."""
    from transformers import AutoModel, AutoTokenizer

    decoder = AutoModel.from_pretrained(str(model))
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.mul_(1.5)
    return decoder, AutoTokenizer.from_pretrained(str(model))


def test_a_passed_decoder_with_changed_weights_gets_its_own_fingerprint(model_dir):
    on_disk = _encoder(model_dir)
    recorded = on_disk.identity()  # fingerprints.json now holds the directory's digest
    decoder, tokenizer = _tuned_copy(model_dir)
    tuned = _encoder(model_dir, decoder=decoder, tokenizer=tokenizer)
    assert float(on_disk.encode_documents([TEXT]).ravel() @ tuned.encode_documents([TEXT]).ravel()) < 0.99
    assert tuned.identity() != recorded


def test_fingerprinting_a_passed_decoder_never_writes_the_directorys_cache(model_dir):
    decoder, tokenizer = _tuned_copy(model_dir)
    tuned_identity = _encoder(model_dir, decoder=decoder, tokenizer=tokenizer).identity()
    del decoder
    gc.collect()
    on_disk = _encoder(model_dir)
    assert on_disk.identity()["model_fingerprint"].endswith(fp.weights_digest(on_disk.model))
    assert on_disk.identity() != tuned_identity


@pytest.mark.parametrize("passed", ["decoder", "tokenizer"])
def test_a_decoder_or_tokenizer_passed_alone_is_refused(model_dir, passed):
    tokenizer = build_tokenizer()
    given = {"decoder": build_model(len(tokenizer), seed=3)} if passed == "decoder" else {"tokenizer": tokenizer}
    with pytest.raises(ValueError, match="together with its tokenizer"):
        _encoder(model_dir, **given)


def test_with_method_loads_another_model_instead_of_sharing_these_weights(model_dir, tmp_path):
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    build_model(len(build_tokenizer("right")), seed=1).save_pretrained(other)
    sibling = _encoder(model_dir).with_method("htp", model=str(other))
    direct = _encoder(other)
    assert sibling.identity() == direct.identity()
    np.testing.assert_allclose(sibling.encode_documents([TEXT]), direct.encode_documents([TEXT]), atol=1e-5)


def test_vectors_that_overflow_raise_instead_of_coming_back_as_nan(model_dir):
    """float16 overflows in the packaged Gemma 3's middle layers; here a weight of inf stands
    in for the overflow."""
    encoder = _encoder(model_dir, dtype="float32")
    with torch.no_grad():
        next(p for name, p in encoder.model.named_parameters() if "mlp" in name).fill_(float("inf"))
    with pytest.raises(NonFiniteVectorsError, match="bfloat16 or float32"):
        encoder.encode_documents([TEXT])


def test_a_config_saved_again_is_loaded_again_while_an_encoder_of_the_old_one_lives(model_dir):
    """The in-memory model is reused per weight files; a config.json (or tokenizer) saved over
    the directory used to be served from the copy built on the old one."""
    import json

    before = _encoder(model_dir)
    vector = before.encode_documents([TEXT])
    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["rms_norm_eps"] = 0.5
    config_file.write_text(json.dumps(config))
    after = _encoder(model_dir)
    assert after.model is not before.model
    assert float(after.encode_documents([TEXT]).ravel() @ vector.ravel()) < 0.9999
