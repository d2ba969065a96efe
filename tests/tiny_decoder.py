"""A tiny randomly initialised Llama decoder with a word-level tokenizer built in code.

Runs a forward pass in milliseconds, so the encoder's mechanics can be tested exactly. Words
outside the vocabulary map to distinct hashed ids rather than one [UNK], because copying
between two identical tokens would hide a wrong copy.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

WORDS = (
    "the a cat dog sat on mat ran in park bird sang tree fish swam sea sun rose over hill "
    "moon set behind house rain fell city night quiet river flowed past mill wind blew "
    "through field protein binds receptor cells grew faster mice treated drug reduced tumour "
    "growth study found results show effect patients trial . , ! ? < > PST B - ( ) : ;"
).split()


def build_tokenizer(padding_side: str = "right", bos: bool = False) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(WORDS)))}
    for i in range(200):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>", padding_side=padding_side,
    )
    return fast


def build_model(vocab_size: int, seed: int = 0, layers: int = 4) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        attn_implementation="sdpa", tie_word_embeddings=True,  # like Gemma 3: rerankable
    )
    return LlamaModel(config).eval()


def build_gemma3(vocab_size: int, seed: int = 0, layers: int = 4, sliding_window: int = 6):
    """A tiny Gemma 3 run by htp-index's own forward pass (htp_embed.gemma3_native), with
    random norm weights (Gemma's are 0 at init) and a sliding window shorter than most texts."""
    from htp_embed.gemma3_native import from_transformers

    return from_transformers(build_gemma3_transformers(vocab_size, seed, layers, sliding_window))


def build_gemma3_transformers(vocab_size: int, seed: int = 0, layers: int = 4, sliding_window: int = 6):
    """The same tiny Gemma 3 as transformers' class (what the encoder runs on a GPU)."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=sliding_window, max_position_embeddings=512, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), attn_implementation="sdpa",
    )
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0, 0.3)
    return model


def tiny_encoder(padding_side: str = "right", bos: bool = False, decoder: str = "llama", **config):
    """An encoder over a tiny decoder: ``llama`` (transformers' class, the hooked forward pass)
    or ``gemma3-native`` (htp-index's own)."""
    from htp_embed import HTPEncoder

    tokenizer = build_tokenizer(padding_side, bos)
    model = build_model(len(tokenizer)) if decoder == "llama" else build_gemma3(len(tokenizer))
    settings = {"model": "tiny", "segmenter": "sentencizer", "show_progress": False,
                "rewire_start": 1, "rewire_stop": 3, "exit_layer": None, **config}
    return HTPEncoder(decoder=model, tokenizer=tokenizer, **settings)


def widths_seen(encoder) -> list[int]:
    """Spy on an encoder's batches: the width of each (positions after any cached prefix)."""
    seen: list[int] = []
    collate = encoder._collate

    def spy(layouts, start=0, width=0):
        batch = collate(layouts, start, width)
        seen.append(batch.ids.shape[1])
        return batch

    encoder._collate = spy
    return seen
