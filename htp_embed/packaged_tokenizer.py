"""A packaged model's tokenizer without transformers: ``tokenizer.json`` read by ``tokenizers``.

The encoder, the chunker and the reranker call a tokenizer as transformers'
``PreTrainedTokenizerFast`` is called, but only a little of it: encode one text or a list
(with or without the template's special tokens, special tokens typed in the text split as
text, offsets), the vocabulary, the special token ids and the padding side. Importing
transformers for that costs ~1 s of a cold ``htp-index query`` (its lazy module table alone
is ~1,100 modules), so a packaged model, whose files ``htp_embed.models`` wrote and knows,
gets this class instead; a user's own model directory keeps ``AutoTokenizer``, whose class
may carry custom logic. ``tests/test_encoder_real_model.py`` compares ids, offsets, special
tokens and vocabulary with ``AutoTokenizer`` on the packaged models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
# The padding side of the tokenizer classes packaged models name (transformers' class
# attribute); any other class is asked of transformers itself.
_PADDING_SIDES = {"GemmaTokenizer": "left", "GemmaTokenizerFast": "left", "LlamaTokenizer": "left",
                  "LlamaTokenizerFast": "left", "GPT2Tokenizer": "right", "GPT2TokenizerFast": "right",
                  "PreTrainedTokenizerFast": "right"}


class PackagedTokenizer:
    """The part of ``PreTrainedTokenizerFast``'s interface htp-index uses, same results."""

    def __init__(self, backend: Tokenizer, *, padding_side: str, special_tokens: dict[str, str]):
        backend.no_truncation()  # transformers turns both off unless a call asks for them
        backend.no_padding()
        self._backend = backend
        self.padding_side = padding_side
        self.special_tokens = dict(special_tokens)
        for key in _SPECIAL_TOKEN_KEYS:
            token = special_tokens.get(key)
            setattr(self, key, token)
            setattr(self, f"{key}_id", backend.token_to_id(token) if token is not None else None)

    @classmethod
    def from_dir(cls, path: Path) -> PackagedTokenizer:
        """The tokenizer saved in ``path`` (``tokenizer.json`` + ``tokenizer_config.json``)."""
        config = json.loads((Path(path) / "tokenizer_config.json").read_text())
        padding_side = config.get("padding_side") or _class_padding_side(str(config.get("tokenizer_class")))
        special = {key: config[key] for key in _SPECIAL_TOKEN_KEYS if isinstance(config.get(key), str)}
        return cls(Tokenizer.from_file(str(Path(path) / "tokenizer.json")), padding_side=padding_side,
                   special_tokens=special)

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True, split_special_tokens: bool = False,
                 return_offsets_mapping: bool = False) -> dict[str, Any]:
        """``{"input_ids": ..., "attention_mask": ...}`` (and ``offset_mapping``) for one text
        (flat lists) or a list of texts (a list per text), as transformers returns them."""
        texts = [text] if isinstance(text, str) else list(text)
        backend = self._backend
        # A flag on the shared backend, set per call as transformers does. Two threads calling
        # with opposite flags (30 batches of 256 long texts each) never saw the other's flag:
        # the call holds the GIL from the flag to the result.
        if backend.encode_special_tokens != split_special_tokens:
            backend.encode_special_tokens = split_special_tokens
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens) if texts else []
        out: dict[str, Any] = {"input_ids": [encoding.ids for encoding in encodings],
                               "attention_mask": [encoding.attention_mask for encoding in encodings]}
        if return_offsets_mapping:
            out["offset_mapping"] = [encoding.offsets for encoding in encodings]
        if isinstance(text, str):
            out = {key: value[0] for key, value in out.items()}
        return out

    def get_vocab(self) -> dict[str, int]:
        """Every token and its id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)


def _class_padding_side(name: str) -> str:
    """The padding side transformers' tokenizer class ``name`` declares ("right" if unknown)."""
    known = _PADDING_SIDES.get(name)
    if known is not None:
        return known
    import transformers

    return str(getattr(getattr(transformers, name, None), "padding_side", "right"))
