"""PackagedTokenizer (htp_embed.packaged_tokenizer) against transformers' fast tokenizer on the
same tokenizer files; the real packaged models' comparison is in test_encoder_real_model.py."""

from __future__ import annotations

import pytest
from tiny_decoder import build_tokenizer

from htp_embed.packaged_tokenizer import PackagedTokenizer

TEXTS = ["the cat sat on the mat .", "<bos> typed as text", "", "fish  swam\tin the sea", "w3 w150 unknownword"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    reference = build_tokenizer(padding_side="left", bos=True)
    path = tmp_path_factory.mktemp("tokenizer")
    reference.save_pretrained(path)
    return reference, PackagedTokenizer.from_dir(path)


@pytest.mark.parametrize("options", [
    {"add_special_tokens": False, "split_special_tokens": True, "return_offsets_mapping": True},
    {"add_special_tokens": True},
    {"add_special_tokens": False},
])
def test_same_ids_and_offsets_as_transformers(saved, options):
    reference, light = saved
    for batch in (TEXTS, TEXTS[0], TEXTS[1]):  # a list, and single texts (flat lists)
        expected, got = reference(batch, **options), light(batch, **options)
        assert got["input_ids"] == expected["input_ids"]
        assert got["attention_mask"] == expected["attention_mask"]
        if "offset_mapping" in expected:
            assert got["offset_mapping"] == expected["offset_mapping"]


def test_same_special_tokens_vocabulary_and_padding_side(saved):
    reference, light = saved
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side"):
        assert getattr(light, attribute) == getattr(reference, attribute), attribute
    assert light.get_vocab() == reference.get_vocab() and len(light) == len(reference)
