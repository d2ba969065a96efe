"""htp-index's own Gemma 3 forward pass against transformers' ``Gemma3TextModel``.

A tiny randomly initialised Gemma 3 (two layer kinds, a sliding window shorter than the texts,
grouped-query attention, random norm weights) is saved like a packaged copy and loaded both
ways; every hidden state the encoder can ask for must agree. The real model's comparison is in
``tests/test_encoder_real_model.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from tiny_decoder import build_tokenizer
from transformers import Gemma3TextConfig, Gemma3TextModel

from htp_embed import HTPEncoder
from htp_embed.fingerprint import model_fingerprint, weights_digest
from htp_embed.gemma3_native import (
    NativeConfig,
    load_native,
    read_safetensors,
    rms_normalise,
    supports,
)
from htp_embed.packed_linear import (
    PackedGeluGateLinear,
    PackedLinear,
    gelu_gate_unavailable_reason,
    pack_linear_layers,
)
from htp_embed.rewiring import EarlyExit, rewired

VOCAB = 300
WINDOW = 6


def tiny_config(**overrides) -> Gemma3TextConfig:
    settings = {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": WINDOW, "max_position_embeddings": 128, "pad_token_id": 0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "attn_implementation": "sdpa",
    }
    return Gemma3TextConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Gemma 3 with random weights (norms included), saved as safetensors."""
    torch.manual_seed(0)
    model = Gemma3TextModel(tiny_config()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0, 0.3)  # Gemma initialises them to 0 (a scale of 1)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def batch(width: int = 12, left: bool = False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (3, width), generator=generator)
    mask = torch.ones(3, width, dtype=torch.long)
    for row, length in ((1, width - 4), (2, 3)):
        if left:
            mask[row, : width - length] = 0
        else:
            mask[row, length:] = 0
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # a left-padded row starts at position 0
    return ids, mask, positions


def reference(model, embeds, mask, positions, exit_after=None, rewire=range(0), src=None, dst=None):
    """transformers' hidden states through the hooks the encoder uses for it."""
    with rewired(model.layers, rewire, src, dst, exit_after), torch.inference_mode():
        try:
            return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         use_cache=False).last_hidden_state
        except EarlyExit as stop:
            return stop.hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("exit_after", [None, 2])
def test_hidden_states_match_transformers(saved, dtype, left, exit_after):
    path, _ = saved
    ref = Gemma3TextModel.from_pretrained(path, dtype=dtype).eval()
    native = load_native(path, dtype)
    ids, mask, positions = batch(left=left)  # 12 positions: past the sliding window of 6
    with torch.inference_mode():
        embeds = ref.get_input_embeddings()(ids)
        torch.testing.assert_close(native.get_input_embeddings()(ids), embeds, rtol=0, atol=0)
        expected = reference(ref, embeds.clone(), mask, positions, exit_after)
        got, _ = native.hidden_states(embeds.clone(), mask, positions, exit_after=exit_after)
    real = mask.bool()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got[real].float(), expected[real].float(), **tolerance)


def test_rewiring_and_a_cached_prefix_match_the_hooked_full_pass(saved):
    path, model = saved
    native = load_native(path, torch.float32)
    ids, mask, positions = batch(width=10)
    src = torch.tensor([[3, 5], [2, 4], [1, 2]])
    dst = torch.tensor([[0, 1], [0, 1], [0, 0]])
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids)
        expected = reference(model, embeds.clone(), mask, positions, exit_after=2, rewire=range(1, 3), src=src, dst=dst)
        got, _ = native.hidden_states(embeds.clone(), mask, positions, rewire=range(1, 3), src=src, dst=dst, exit_after=2)
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)

        # The first 4 positions as a prefix shared by every row: the rest attends to its keys.
        shared = torch.tensor([5, 6, 7, 8])
        full_ids = torch.cat([shared.expand(3, -1), ids], dim=1)
        full_mask = torch.cat([torch.ones(3, 4, dtype=torch.long), mask], dim=1)
        full_positions = torch.cat([torch.arange(4).expand(3, -1), positions + 4], dim=1)
        plain, _ = native.hidden_states(native.get_input_embeddings()(full_ids), full_mask, full_positions, exit_after=2)
        prefix = native.prefix_states(shared.tolist(), exit_after=2)
        reused, _ = native.hidden_states(native.get_input_embeddings()(ids), full_mask, positions + 4,
                                         exit_after=2, prefix=prefix)
    torch.testing.assert_close(reused[mask.bool()], plain[:, 4:][mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrix_product_attention_gives_the_same_states(saved, monkeypatch, dtype):
    """The kernel the encoder picks where it measures faster (htp_embed.attention), forced on
    for these small passes: padded rows, a sliding window, grouped heads and a cached prefix."""
    from htp_embed import attention

    monkeypatch.setattr(attention, "MIN_SCORES", 0)
    native = load_native(saved[0], dtype)
    assert native.attention_kernel == "fused"
    ids, mask, positions = batch(left=True)
    shared = native.prefix_states([5, 6, 7], exit_after=2)
    full_mask = torch.cat([torch.ones(3, 3, dtype=torch.long), mask], dim=1)
    with torch.inference_mode():
        embeds = native.get_input_embeddings()(ids)
        states = {}
        for kernel in ("fused", "matmul"):
            native.attention_kernel = kernel
            plain, _ = native.hidden_states(embeds.clone(), mask, positions, exit_after=2)
            reused, _ = native.hidden_states(embeds.clone(), full_mask, positions + 3, exit_after=2, prefix=shared)
            states[kernel] = plain[mask.bool()].float(), reused[mask.bool()].float()
    for fused, products in zip(states["fused"], states["matmul"], strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(products, fused, rtol=1e-5, atol=1e-5)
        else:  # the products round the scores to bfloat16 before the softmax, as transformers' eager attention
            assert float((products - fused).abs().max()) <= 0.02 * float(fused.abs().max())
            assert float(F.cosine_similarity(products, fused).min()) > 0.999


def test_the_fingerprint_names_the_weights_as_transformers_does(saved):
    """Fused projections are hashed under transformers' names: an index built through one
    implementation accepts the other's encoder."""
    path, _ = saved
    ref = Gemma3TextModel.from_pretrained(path, dtype=torch.bfloat16)
    native = load_native(path, torch.bfloat16)
    assert weights_digest(native) == weights_digest(ref)
    assert model_fingerprint(native) == model_fingerprint(ref)
    assert dict(native.canonical_parameters()).keys() == dict(ref.named_parameters()).keys()


def test_a_loaded_model_is_fingerprinted_once_per_checkpoint(saved, tmp_path, monkeypatch):
    """Like transformers' models, a loaded one names its directory, so once the encoder's
    loader marks it as read from there (``remember_checkpoint``), the weights' digest comes
    from the cache on later loads instead of hashing the whole file each time."""
    from htp_embed import fingerprint

    def loaded() -> torch.nn.Module:
        model = load_native(path, torch.float32)
        fingerprint.remember_checkpoint(model, fingerprint.checkpoint_key(str(path)))
        return model

    path, _ = saved
    first = fingerprint.model_fingerprint(loaded(), cache_dir=tmp_path)
    monkeypatch.setattr(fingerprint, "weights_digest", lambda model: pytest.fail("hashed again"))
    assert fingerprint.model_fingerprint(loaded(), cache_dir=tmp_path) == first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_projections_give_the_same_states(saved, dtype):
    """Packed projections, and the feed-forward's tanh-GELU and product fused into its packed
    projection, compute what the plain layers do (bfloat16: to its rounding)."""
    path, _ = saved
    native = load_native(path, dtype)
    ids, mask, positions = batch()
    with torch.inference_mode():
        embeds = native.get_input_embeddings()(ids)
        plain, _ = native.hidden_states(embeds.clone(), mask, positions)
        if not pack_linear_layers(native.layers):
            pytest.skip("this PyTorch cannot pack Linear weights")
        assert isinstance(native.layers[0].self_attn.qkv_proj, PackedLinear)
        fused = isinstance(native.layers[0].mlp.gate_up_proj, PackedGeluGateLinear)
        assert fused == (gelu_gate_unavailable_reason() is None)
        packed, _ = native.hidden_states(embeds.clone(), mask, positions)
    real = mask.bool()
    if dtype == torch.float32:
        torch.testing.assert_close(packed[real], plain[real], rtol=1e-4, atol=1e-4)
    else:
        cosine = F.cosine_similarity(packed[real].float(), plain[real].float(), dim=-1)
        assert float(cosine.min()) > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norm_is_transformers_rmsnorm_bit_for_bit_and_leaves_its_input(dtype):
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 7, 64, generator=generator) * 4).to(dtype)
    scale = 1.0 + torch.randn(64, generator=generator) * 0.3
    before = x.clone()
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * scale).type_as(x)
    got = rms_normalise(x, scale, 1e-6)
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    assert torch.equal(x, before)  # a float32 input is not normalised in place


def test_query_and_key_norms_follow_their_weights(saved):
    """Queries and keys are normed in one pass with a cached scale built from both norms'
    weights: a weight changed in place must reach it, as it reaches transformers' norms."""
    path, _ = saved
    ref = Gemma3TextModel.from_pretrained(path, dtype=torch.float32).eval()
    native = load_native(path, torch.float32)
    ids, mask, positions = batch()
    real = mask.bool()
    with torch.inference_mode():
        embeds = ref.get_input_embeddings()(ids)
        before, _ = native.hidden_states(embeds.clone(), mask, positions)
        for model in (ref, native):
            model.layers[1].self_attn.k_norm.weight.add_(0.5)
            model.layers[2].self_attn.q_norm.weight.mul_(-1.0)
        expected = reference(ref, embeds.clone(), mask, positions)
        after, _ = native.hidden_states(embeds.clone(), mask, positions)
    assert not torch.allclose(after[real], before[real], atol=1e-3)
    torch.testing.assert_close(after[real], expected[real], rtol=1e-5, atol=1e-5)


def test_the_encoder_gives_the_same_vectors_through_either_implementation(saved):
    path, _ = saved
    tokenizer = build_tokenizer(padding_side="left", bos=True)
    settings = {"model": "tiny-gemma3", "segmenter": "sentencizer", "show_progress": False,
                "rewire_start": 1, "rewire_stop": 3, "exit_layer": 3, "query_instruction": "the cat sat on : ",
                "max_length": 128}  # the positions tiny_config gives
    native = HTPEncoder(decoder=load_native(path, torch.float32), tokenizer=tokenizer, **settings)
    hooked = HTPEncoder(decoder=Gemma3TextModel.from_pretrained(path).eval(), tokenizer=tokenizer, **settings)
    assert native.native and not hooked.native
    texts = ["the cat sat on the mat . the dog ran in the park .", "fish swam . sun rose over hill .",
             "moon set behind house . rain fell . city night quiet ."]
    np.testing.assert_allclose(native.encode_documents(texts), hooked.encode_documents(texts), atol=1e-5)
    np.testing.assert_allclose(native.encode_queries(texts), hooked.encode_queries(texts), atol=1e-5)
    assert native._prefix_cache is not None and native._prefix_cache.verified  # the prefix was reused
    assert native.identity() == hooked.identity()


def test_transformers_calling_convention_for_other_callers(saved):
    """The reranker and benchmarks call the model as transformers' AutoModel."""
    path, model = saved
    native = load_native(path, torch.float32)
    ids, mask, positions = batch()
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = native(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    assert len(got.hidden_states) == len(expected.hidden_states)
    torch.testing.assert_close(got.hidden_states[2][real], expected.hidden_states[2][real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [
    {"use_bidirectional_attention": True},
    {"attn_logit_softcapping": 50.0},
    {"model_type": "llama"},
    {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
])
def test_configs_it_does_not_implement_are_left_to_transformers(saved, change):
    path, _ = saved
    config = NativeConfig.from_dir(path)
    assert supports(config)
    assert not supports(NativeConfig({**config.to_dict(), **change}))


def test_weights_of_another_layout_are_refused(saved, tmp_path):
    from safetensors.torch import save_file

    path, _ = saved
    state = {name: tensor.clone() for name, tensor in read_safetensors(path / "model.safetensors").items()}
    del state["layers.0.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="k_proj"):
        load_native(tmp_path, torch.float32)


@pytest.mark.parametrize("keep", [4, 100, -1000])  # no header, a cut header, cut tensor data
def test_a_damaged_weights_file_says_so_and_how_to_recover(saved, tmp_path, keep):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:keep])
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="is damaged .* delete its folder"):
        load_native(tmp_path, torch.float32)


def test_weights_are_memory_mapped_not_copied(saved):
    """The embedding (most of a real model's bytes) stays a view of the file's map (storage
    torch does not own, hence cannot resize); the fused projections are new tensors."""
    path, _ = saved
    native = load_native(path, torch.float32)
    assert not native.embed_tokens.weight.untyped_storage().resizable()
    assert native.layers[0].self_attn.qkv_proj.weight.untyped_storage().resizable()


def test_info_says_which_code_runs_the_decoder(monkeypatch):
    from htp_cli.main import _forward_pass

    monkeypatch.delenv("HTP_INDEX_ENCODER__IMPLEMENTATION", raising=False)
    monkeypatch.setenv("HTP_INDEX_ENCODER__DEVICE", "cpu")
    assert "own Gemma 3 forward pass" in _forward_pass({"model": "gemma3-270m"})
    assert "transformers' model class" in _forward_pass({"model": "smollm2-135m"})
    monkeypatch.setenv("HTP_INDEX_ENCODER__IMPLEMENTATION", "transformers")
    assert "implementation='transformers'" in _forward_pass({"model": "gemma3-270m"})
