"""A user's model directory that cannot embed is refused by name, not run: without tokenizer
files transformers built a 5-token tokenizer and every vector came out equal; another model's
tokenizer, or a bidirectional encoder run as a decoder, embedded without a word."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_decoder import build_model, build_tokenizer

from htp_embed.models import load_model
from htp_embed.packaged_models import ModelNotAvailableError


def test_a_directory_without_tokenizer_files_is_refused(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    with pytest.raises(ModelNotAvailableError, match="holds no tokenizer"):
        load_model(str(bare), dtype=torch.float32)


def test_a_tokenizer_of_another_size_than_the_embedding_is_refused(tmp_path):
    tokenizer = build_tokenizer("right")
    for rows, case in ((len(tokenizer) * 4, "much larger"), (len(tokenizer) - 10, "smaller")):
        folder = tmp_path / case.replace(" ", "-")
        build_model(rows).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with pytest.raises(ModelNotAvailableError, match="belong to different models"):
            load_model(str(folder), dtype=torch.float32)
    padded = tmp_path / "padded"  # a few rows more than tokens: what real models do
    build_model(len(tokenizer) + 8).save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    model, loaded = load_model(str(padded), dtype=torch.float32)
    assert len(loaded) == len(tokenizer)


def test_a_bidirectional_encoder_is_refused(tmp_path):
    from transformers import ModernBertConfig, ModernBertModel

    tokenizer = build_tokenizer("right")
    config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, pad_token_id=0,
                              bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3)
    ModernBertModel(config).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ModelNotAvailableError, match="not a decoder-only language model"):
        load_model(str(tmp_path / "encoder"), dtype=torch.float32)


def test_the_tiny_decoder_directory_still_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), dtype=torch.float32)
    assert model.config.vocab_size == len(tokenizer)


def _copy_of(tiny_model_dir, folder):
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_a_checkpoint_missing_tensors_is_refused_rather_than_filled_at_random(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_of(tiny_model_dir, tmp_path / "missing")
    weights = load_file(folder / "model.safetensors")
    kept = {key: value for key, value in weights.items() if not key.startswith("layers.1.")}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelNotAvailableError, match=r"missing.*lacks 9 of the model's tensors \(layers\.1\."):
        load_model(str(folder), dtype=torch.float32)


def test_a_causal_lm_checkpoint_with_its_own_lm_head_still_loads(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer("right")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "clm")  # lm_head.weight is unexpected
    tokenizer.save_pretrained(tmp_path / "clm")
    model, _ = load_model(str(tmp_path / "clm"), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100, None], ids=["empty", "garbage", "truncated"])
def test_an_unreadable_checkpoint_is_refused_naming_the_folder(tiny_model_dir, tmp_path, content):
    folder = _copy_of(tiny_model_dir, tmp_path / "broken")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2] if content is None else content)
    with pytest.raises(ModelNotAvailableError, match=r"broken \(model\.safetensors\) are not a readable checkpoint"):
        load_model(str(folder), dtype=torch.float32)


def test_a_decoder_without_the_settings_the_encoder_reads_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2Model

    tokenizer = build_tokenizer("right")
    GPT2Model(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelNotAvailableError, match=r"gpt2 \(gpt2\) is not a supported decoder .*Llama.*no intermediate_size"):
        load_model(str(tmp_path / "gpt2"), dtype=torch.float32)
