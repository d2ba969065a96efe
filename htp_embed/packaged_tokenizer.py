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
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenizers import Tokenizer

from htp_embed import text_ahead
from htp_embed.packaged_models import DamagedCopyError

if TYPE_CHECKING:
    from htp_embed.text_ahead import PendingTokens, TokenCall

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
# The padding side of the tokenizer classes packaged models name (transformers' class
# attribute); any other class is asked of transformers itself.
_PADDING_SIDES = {"GemmaTokenizer": "left", "GemmaTokenizerFast": "left", "LlamaTokenizer": "left",
                  "LlamaTokenizerFast": "left", "GPT2Tokenizer": "right", "GPT2TokenizerFast": "right",
                  "PreTrainedTokenizerFast": "right"}


def _special_id_property(key: str) -> property:
    """``<key>_id``: the id of special token ``key`` (None where the tokenizer has none)."""
    return property(lambda self: self._special_id(key), doc=f"The id of the {key.replace('_', ' ')}, or None.")


class PackagedTokenizer:
    """The part of ``PreTrainedTokenizerFast``'s interface htp-index uses, same results.

    Built by :meth:`from_dir` while a side process holds answers for this directory (a cold
    query, :mod:`htp_embed.text_ahead`), it reads ``tokenizer.json`` only when asked something
    those answers do not hold; otherwise it reads it at once.
    """

    def __init__(self, path: Path, *, padding_side: str, special_tokens: dict[str, str],
                 ahead: PendingTokens | None = None):
        self.path = Path(path)
        self.padding_side = padding_side
        self.special_tokens = dict(special_tokens)
        for key in _SPECIAL_TOKEN_KEYS:
            setattr(self, key, special_tokens.get(key))
        self._ahead = ahead
        self._answered: dict[tuple[str, bool, bool], _Encoding] | None = None
        self._special_ids: dict[str, int | None] = {}
        self._loaded: Tokenizer | None = None
        self._load_lock = threading.Lock()
        if ahead is None:
            self._backend()  # a broken tokenizer.json is reported at load, as transformers does

    @classmethod
    def from_dir(cls, path: Path) -> PackagedTokenizer:
        """The tokenizer saved in ``path`` (``tokenizer.json`` + ``tokenizer_config.json``)."""
        config = json.loads((Path(path) / "tokenizer_config.json").read_text())
        padding_side = config.get("padding_side") or _class_padding_side(str(config.get("tokenizer_class")))
        special = {key: config[key] for key in _SPECIAL_TOKEN_KEYS if isinstance(config.get(key), str)}
        return cls(Path(path), padding_side=padding_side, special_tokens=special, ahead=text_ahead.tokens_for(Path(path)))

    @property
    def loaded(self) -> bool:
        """Whether this process has read ``tokenizer.json`` (a cold query need not)."""
        return self._loaded is not None

    def _backend(self) -> Tokenizer:
        backend = self._loaded
        if backend is None:
            with self._load_lock:
                if self._loaded is None:
                    try:
                        loaded = Tokenizer.from_file(str(self.path / "tokenizer.json"))
                    except Exception as error:  # the Rust reader's errors name no file
                        raise DamagedCopyError(self.path, f"tokenizer.json: {error}") from error
                    loaded.no_truncation()  # transformers turns both off unless a call asks for them
                    loaded.no_padding()
                    self._loaded = loaded
                backend = self._loaded
        return backend

    def _answers(self) -> dict[tuple[str, bool, bool], _Encoding]:
        """The side process's encodings by (text, add_special_tokens, split_special_tokens)."""
        if self._answered is None:
            record = self._ahead.result() if self._ahead is not None else None
            answered: dict[tuple[str, bool, bool], _Encoding] = {}
            if record is not None:
                for text, add, split, ids, mask, offsets in record["encodings"]:
                    answered[(text, add, split)] = _Encoding(ids, mask, [(a, b) for a, b in offsets])
                self._special_ids.update(record["special_ids"])
            self._answered = answered
        return self._answered

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        if token is None:
            return None
        self._answers()
        if key not in self._special_ids:
            self._special_ids[key] = self._backend().token_to_id(token)
        return self._special_ids[key]

    bos_token_id = _special_id_property("bos_token")
    eos_token_id = _special_id_property("eos_token")
    pad_token_id = _special_id_property("pad_token")
    unk_token_id = _special_id_property("unk_token")
    mask_token_id = _special_id_property("mask_token")

    def _encode(self, texts: list[str], add_special_tokens: bool, split_special_tokens: bool) -> list[_Encoding]:
        answered = self._answers()
        if answered:  # (never looked up where nothing was answered: an ingest's batches)
            found = [answered.get((text, add_special_tokens, split_special_tokens)) for text in texts]
            if all(encoding is not None for encoding in found):  # copies: a caller may edit its lists
                return [_Encoding(list(e.ids), list(e.attention_mask), list(e.offsets)) for e in found]  # type: ignore[union-attr]
        backend = self._backend()
        # A flag on the shared backend, set per call as transformers does. Two threads calling
        # with opposite flags (30 batches of 256 long texts each) never saw the other's flag:
        # the call holds the GIL from the flag to the result.
        if backend.encode_special_tokens != split_special_tokens:
            backend.encode_special_tokens = split_special_tokens
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens) if texts else []
        return [_Encoding(e.ids, e.attention_mask, e.offsets) for e in encodings]

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True, split_special_tokens: bool = False,
                 return_offsets_mapping: bool = False) -> dict[str, Any]:
        """``{"input_ids": ..., "attention_mask": ...}`` (and ``offset_mapping``) for one text
        (flat lists) or a list of texts (a list per text), as transformers returns them."""
        texts = [text] if isinstance(text, str) else list(text)
        encodings = self._encode(texts, add_special_tokens, split_special_tokens)
        out: dict[str, Any] = {"input_ids": [encoding.ids for encoding in encodings],
                               "attention_mask": [encoding.attention_mask for encoding in encodings]}
        if return_offsets_mapping:
            out["offset_mapping"] = [encoding.offsets for encoding in encodings]
        if isinstance(text, str):
            out = {key: value[0] for key, value in out.items()}
        return out

    def answers(self, calls: list[TokenCall]) -> dict[str, Any]:
        """What a side process sends back (:mod:`htp_embed.text_ahead`): each call's encoding
        with offsets, and the special tokens' ids, in JSON's types."""
        encodings = []
        for call in calls:
            (encoding,) = self._encode([call.text], call.add_special_tokens, call.split_special_tokens)
            encodings.append([call.text, call.add_special_tokens, call.split_special_tokens, encoding.ids,
                              encoding.attention_mask, encoding.offsets])
        return {"special_ids": {key: self._special_id(key) for key in self.special_tokens}, "encodings": encodings}

    def get_vocab(self) -> dict[str, int]:
        """Every token and its id, added tokens included."""
        return self._backend().get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._backend().get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        backend = self._backend()
        return [backend.id_to_token(i) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend().decode(ids, skip_special_tokens=skip_special_tokens)


class _Encoding(NamedTuple):
    ids: list[int]
    attention_mask: list[int]
    offsets: list[tuple[int, int]]


def _class_padding_side(name: str) -> str:
    """The padding side transformers' tokenizer class ``name`` declares ("right" if unknown)."""
    known = _PADDING_SIDES.get(name)
    if known is not None:
        return known
    import transformers

    return str(getattr(getattr(transformers, name, None), "padding_side", "right"))
