"""The HTP encoder's mechanics, checked exactly on a tiny random decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_decoder import tiny_encoder

from htp_embed import EmptyTextError, EncoderConfig, KPolicy
from htp_embed.layout import BPST, PST

THREE_SENTENCES = "the cat sat on the mat . the dog ran in the park ! a bird sang"
TEXTS = [
    THREE_SENTENCES,
    "fish swam",
    "the sun rose over the hill . moon set behind house . rain fell on city . wind blew",
    "protein binds receptor",
]


def positions(ids: list[int], token: int) -> list[int]:
    return [i for i, t in enumerate(ids) if t == token]


@pytest.mark.parametrize(("bos", "sink"), [(False, "off"), (False, "auto"), (True, "auto")])
def test_placeholders_sit_before_each_block_and_after_the_template(bos, sink):
    encoder = tiny_encoder(bos=bos, k=1, attention_sink=sink)
    layout = encoder.layouts([THREE_SENTENCES])[0]
    prefix = 1 if bos or sink == "auto" else 0  # the template's BOS, or a sink token in its place
    assert layout.n_blocks == 3
    assert positions(layout.ids, BPST) == [prefix, prefix + 1, prefix + 2]
    psts = positions(layout.ids, PST)
    assert len(psts) == 3
    # each <PST> opens a block: the token after it begins a sentence of the text
    words = THREE_SENTENCES.split()
    vocab = encoder.tokenizer.get_vocab()
    assert [layout.ids[p + 1] for p in psts] == [vocab["the"], vocab["the"], vocab["a"]]
    assert layout.ids[psts[1] - 1] == vocab["."] and layout.ids[psts[2] - 1] == vocab["!"]
    # pooled positions are exactly the text tokens
    assert len(layout.pool) == len(words)
    assert all(layout.ids[p] >= 0 for p in layout.pool)
    # PST m and B-PST m are both fed from the end of block m
    block_ends = [psts[1] - 1, psts[2] - 1, len(layout.ids) - 1]
    assert sorted(zip(layout.copy_dst, layout.copy_src, strict=False)) == sorted(
        list(zip(psts, block_ends, strict=False)) + [(prefix + m, block_ends[m]) for m in range(3)]
    )


def test_a_sink_token_goes_first_only_when_the_template_has_no_bos_and_placeholders_are_used():
    from htp_embed import config_from_identity

    vocab_bos = tiny_encoder(bos=False).tokenizer.get_vocab()["<bos>"]
    sunk = tiny_encoder(bos=False, k=1)
    assert sunk.sink_token == vocab_bos and sunk.layouts(["the cat sat ."])[0].ids[0] == vocab_bos
    assert sunk.identity()["attention_sink"] == vocab_bos and sunk.describe().endswith(",sink]")
    assert 0 not in sunk.layouts(["the cat sat ."])[0].pool  # the sink is never pooled
    assert tiny_encoder(bos=True, k=1).sink_token is None  # a BOS already holds the sink
    assert tiny_encoder(bos=False, k=1, attention_sink="off").sink_token is None
    assert tiny_encoder(bos=False, method="vanilla").sink_token is None  # vanilla stays plain pooling
    # reopening an index: the identity reproduces the encoder, with or without a sink
    assert config_from_identity(sunk.identity()).attention_sink == "auto"
    plain = tiny_encoder(bos=False, k=1, attention_sink="off")
    assert config_from_identity(plain.identity()).attention_sink == "off"
    assert "attention_sink" not in plain.identity()


def test_k_groups_sentences_into_blocks():
    encoder = tiny_encoder(k=2)
    layout = encoder.layouts([TEXTS[2]])[0]
    assert layout.n_blocks == 2


def test_adaptive_k_is_one_for_short_texts_and_bounds_blocks_for_long_ones():
    policy = KPolicy(kind="adaptive", max_blocks=4)
    assert [policy.sentences_per_block(n) for n in (1, 4, 5, 8, 9, 40)] == [1, 1, 2, 2, 3, 10]
    encoder = tiny_encoder(k="adaptive:2")
    assert encoder.layouts([TEXTS[2]])[0].n_blocks == 2
    assert encoder.layouts([THREE_SENTENCES])[0].n_blocks == 2
    assert encoder.layouts(["the cat sat ."])[0].n_blocks == 1


def test_k_policy_parsing():
    assert KPolicy.parse("adaptive:12") == KPolicy(kind="adaptive", max_blocks=12)
    assert KPolicy.parse(8) == KPolicy(kind="fixed", k=8)
    assert EncoderConfig(k="4").k.k == 4
    assert KPolicy.parse(" Adaptive ") == KPolicy() and KPolicy.parse({"kind": "fixed", "k": 2}).k == 2
    # each was read as another policy without a word: adaptive:8 for the spellings, K = 1 for true
    for wrong in ("many", "adaptive8", "adaptive-12", "adaptive;4", "adaptive:", "4.5", True,
                  {"kind": "adaptive", "max_block": 3}):
        with pytest.raises(ValueError):
            KPolicy.parse(wrong)
        with pytest.raises(ValueError):
            EncoderConfig(k=wrong)


def test_literal_placeholder_text_stays_text():
    encoder = tiny_encoder(bos=True)
    layout = encoder.layouts(["the cat <PST> sat <B-PST> <bos> dog"])[0]
    # one block -> exactly one <PST> and one <B-PST>, both ours
    assert positions(layout.ids, PST) == [2] and positions(layout.ids, BPST) == [1]
    vocab = encoder.tokenizer.get_vocab()
    assert layout.ids.count(vocab["<"]) == 3  # "<PST>", "<B-PST>", "<bos>" tokenised as text
    assert layout.ids.count(vocab["<bos>"]) == 1  # only the template's own


@pytest.mark.parametrize("method", ["htp", "vanilla", "echo", "tp", "prompteol"])
def test_no_sequence_exceeds_max_length(method):
    encoder = tiny_encoder(bos=True, k=1, max_length=24, method=method)
    long_text = " . ".join(f"w{i} w{i + 1} w{i + 2}" for i in range(0, 120, 3))
    for is_query in (False, True):
        layout = encoder.layouts([long_text], is_query=is_query)[0]
        assert len(layout) <= 24
        assert layout.truncated
    vectors = encoder.encode_documents([long_text])
    assert encoder.stats.truncated == 1 and np.isfinite(vectors).all()


def document(n_tokens: int, sentences: int) -> str:
    """A text of exactly ``n_tokens`` tiny-tokenizer tokens in ``sentences`` sentences."""
    words = [f"w{i % 200}" for i in range(n_tokens)]
    for s in range(1, sentences + 1):
        words[s * n_tokens // sentences - 1] = "."
    return " ".join(words)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize(
    ("method", "settings", "sentences"),
    [
        ("htp", {}, 8),  # adaptive K: at most max_blocks=8 blocks
        ("htp", {"k": 1}, 16),  # fixed K is budgeted for 16 blocks
        ("htp", {"local_tokens": False}, 8),
        ("tp", {}, 3),
        ("vanilla", {}, 3),
        ("last", {}, 3),
        ("echo", {}, 3),
        ("prompteol", {}, 3),
    ],
)
def test_a_document_of_text_budget_tokens_fits_one_window(method, settings, sentences, bos):
    encoder = tiny_encoder(bos=bos, method=method, max_length=96, **settings)
    budget = encoder.text_budget
    assert budget + encoder.placeholder_budget == 96 and budget > 32
    fitting, overlong = document(budget, sentences), document(budget + 3, sentences)
    assert encoder.count_tokens(fitting) == budget
    assert not encoder.layouts([fitting])[0].truncated
    assert encoder.layouts([overlong])[0].truncated


def test_placeholder_budget_counts_template_sink_and_slots():
    assert tiny_encoder(bos=True, method="vanilla").placeholder_budget == 1  # <bos>
    assert tiny_encoder(bos=False, method="vanilla").placeholder_budget == 0
    assert tiny_encoder(bos=False, method="tp").placeholder_budget == 2  # sink + <PST>
    assert tiny_encoder(bos=True, k="adaptive:8").placeholder_budget == 1 + 16


def test_encode_with_stats_reports_this_calls_work():
    encoder = tiny_encoder(bos=True, k=1, max_length=24, method="vanilla")
    long_text = " ".join(f"w{i}" for i in range(40))
    encoded = encoder.encode_with_stats(["the cat sat", long_text])
    assert (encoded.texts, encoded.tokens, encoded.truncated) == (2, 3 + 23, 1)
    np.testing.assert_array_equal(encoded.vectors, encoder.encode_documents(["the cat sat", long_text]))
    assert (encoder.stats.texts, encoder.stats.tokens, encoder.stats.truncated) == (4, 52, 2)  # running totals


def test_rewired_layer_inputs_hold_the_block_end_states():
    encoder = tiny_encoder(k=1, rewire_start=1, rewire_stop=3)
    layout = encoder.layouts([THREE_SENTENCES])[0]
    captured_out: dict[int, torch.Tensor] = {}
    captured_in: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(encoder._layers):
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=index: captured_out.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())
        ))
        # a forward hook sees the input the layer actually ran on, i.e. after rewiring
        handles.append(layer.register_forward_hook(
            lambda m, a, o, i=index: captured_in.__setitem__(i, a[0].clone())
        ))
    try:
        encoder._embed_layouts([layout])
    finally:
        for handle in handles:
            handle.remove()
    for layer in (1, 2):
        for src, dst in zip(layout.copy_src, layout.copy_dst, strict=True):
            torch.testing.assert_close(captured_in[layer][0, dst], captured_out[layer - 1][0, src])
    # outside the rewired range nothing is copied: the placeholder differs from the block end
    for src, dst in zip(layout.copy_src, layout.copy_dst, strict=True):
        assert not torch.allclose(captured_in[3][0, dst], captured_out[2][0, src])


def test_htp_without_placeholders_or_rewiring_equals_vanilla():
    htp = tiny_encoder(k=1, global_tokens=False, local_tokens=False, rewire_start=0, rewire_stop=0, attention_sink="off")
    vanilla = htp.with_method("vanilla")
    np.testing.assert_allclose(htp.encode_documents(TEXTS), vanilla.encode_documents(TEXTS), atol=1e-6)


def test_placeholders_change_the_embedding():
    htp = tiny_encoder(k=1)
    vanilla = htp.with_method("vanilla")
    cos = (htp.encode_documents([THREE_SENTENCES]) * vanilla.encode_documents([THREE_SENTENCES])).sum()
    assert cos < 0.9999


@pytest.mark.parametrize("exit_layer", [2, -3])  # 4 layers: -3 is the 2nd
def test_early_exit_equals_that_layers_hidden_state_and_skips_later_layers(exit_layer):
    encoder = tiny_encoder(method="vanilla", exit_layer=exit_layer)
    layout = encoder.layouts([TEXTS[0]])[0]
    ran: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
        for i, layer in enumerate(encoder._layers)
    ]
    try:
        vector = encoder.encode_documents([TEXTS[0]])[0]
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1]  # layers 3 and 4 never ran
    ids = torch.tensor([layout.ids])
    with torch.no_grad():
        hidden = encoder.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    expected = hidden[layout.pool].mean(0)
    np.testing.assert_allclose(vector, (expected / expected.norm()).numpy(), atol=1e-5)


def test_pooling_excludes_placeholders_and_template_tokens():
    encoder = tiny_encoder(bos=True, k=1, exit_layer=-1)
    encoder._prefix_cache = None  # the hook reads full-length states (the cache: test_encoder_prefix_cache)
    layout = encoder.layouts([THREE_SENTENCES], is_query=True)[0]
    hidden_at: dict[str, torch.Tensor] = {}
    last = encoder._layers[-1]
    handle = last.register_forward_hook(
        lambda m, a, o: hidden_at.__setitem__("h", (o[0] if isinstance(o, tuple) else o).clone())
    )
    try:
        vector = encoder._embed_layouts([layout])[0]
    finally:
        handle.remove()
    text_positions = [i for i, t in enumerate(layout.ids) if t >= 0][1 + len(encoder.tokenize(encoder.config.query_instruction)):]
    assert text_positions == layout.pool
    expected = hidden_at["h"][0, layout.pool].mean(0)
    np.testing.assert_allclose(vector, (expected / expected.norm()).numpy(), atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", ["htp", "vanilla", "last", "echo", "tp", "prompteol"])
@pytest.mark.parametrize("decoder", ["llama", "gemma3-native"])
def test_a_text_alone_equals_the_same_text_in_a_padded_batch(padding_side, method, decoder):
    """Padding never leaks into a text's vector (for the native decoder also across its sliding
    window, 6 positions here: the batch's texts are longer)."""
    encoder = tiny_encoder(padding_side=padding_side, bos=padding_side == "left", decoder=decoder, method=method, k=1)
    short = "fish swam"
    alone = encoder.encode_documents([short])[0]
    batch = encoder.encode_documents([TEXTS[2], short, TEXTS[0]])[1]
    assert abs(float(alone @ batch) - 1.0) < 1e-5


def test_order_is_kept_after_length_sorting():
    encoder = tiny_encoder(batch_size=2, k=1)
    together = encoder.encode_documents(TEXTS)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(together[i], encoder.encode_documents([text])[0], atol=1e-5)


def test_output_is_float32_normalised_and_deterministic():
    encoder = tiny_encoder()
    # bit for bit on the same number of threads (a trial on one thread may round differently)
    encoder.threads.enabled = False
    first = encoder.encode_documents(TEXTS)
    assert first.dtype == np.float32 and first.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, encoder.encode_documents(TEXTS))


def test_queries_use_the_instruction():
    encoder = tiny_encoder()
    assert not np.allclose(encoder.encode_queries(TEXTS[:1]), encoder.encode_documents(TEXTS[:1]))


@pytest.mark.parametrize("bad", ["", "   \n\t "])
def test_empty_text_gets_a_clear_error(bad):
    encoder = tiny_encoder()
    with pytest.raises(EmptyTextError, match="text 1 is empty"):
        encoder.encode_documents(["the cat", bad])


def test_a_single_string_is_refused():
    with pytest.raises(TypeError, match="list of texts"):
        tiny_encoder().encode_documents("the cat sat")


def test_empty_list_gives_empty_matrix():
    assert tiny_encoder().encode_documents([]).shape == (0, 64)


def test_out_of_memory_halves_the_batch_and_retries(monkeypatch):
    import htp_embed.encoder

    monkeypatch.setattr(htp_embed.encoder, "CPU_PADDING_TOLERANCE", 1.0)  # batches by count only
    encoder = tiny_encoder(batch_size=4)
    real = encoder._embed_layouts
    sizes: list[int] = []

    def flaky(layouts, **options):
        sizes.append(len(layouts))
        if len(layouts) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(layouts, **options)

    monkeypatch.setattr(encoder, "_embed_layouts", flaky)
    vectors = encoder.encode_documents(TEXTS)
    assert sizes[:3] == [4, 2, 1] and vectors.shape == (4, 64)


def test_identity_names_what_decides_the_vectors():
    htp = tiny_encoder(k="adaptive:6")
    identity = htp.identity()
    assert identity["method"] == "htp" and identity["k"] == "adaptive:6"
    assert identity["rewire"] == [1, 3]
    assert htp.with_method("vanilla").identity() != identity


def test_invalid_exit_layer_is_refused():
    with pytest.raises(ValueError, match="exit_layer"):
        tiny_encoder(exit_layer=9)


@pytest.mark.parametrize("settings", [{"k": "adaptive:6"}, {"method": "vanilla", "exit_layer": -2}, {"method": "tp"}])
def test_identity_round_trips_to_the_same_encoder(settings):
    from htp_embed import config_from_identity

    encoder = tiny_encoder(**settings)
    config = config_from_identity(encoder.identity(), segmenter="sentencizer")
    rebuilt = encoder.with_method(config.method, **config.model_dump(exclude={"method", "model"}))
    assert rebuilt.identity() == encoder.identity()


def test_adaptive_k_counts_only_the_sentences_that_fit_the_window():
    text = " ".join(["the cat sat on the mat ."] * 200)
    encoder = tiny_encoder(k="adaptive:4", max_length=48)
    fitted = " ".join(["the cat sat on the mat ."] * 5)  # about what 48 tokens hold
    assert encoder.layouts([text])[0].n_blocks == encoder.layouts([fitted])[0].n_blocks > 1


def test_cpu_batches_end_before_a_text_that_would_be_mostly_padding():
    encoder = tiny_encoder(batch_size=8)
    texts = ["w1 " * 40, "w2 " * 39, "w3 " * 10, "w4 " * 9]
    sizes: list[int] = []
    real = encoder._embed_layouts

    def spy(layouts, **options):
        sizes.append(len(layouts))
        return real(layouts, **options)

    encoder._embed_layouts = spy
    vectors = encoder.encode_documents(texts)
    assert sizes == [2, 2]  # the two long texts together, the two short ones together
    for i, text in enumerate(texts):
        np.testing.assert_allclose(vectors[i], encoder.encode_documents([text])[0], atol=1e-5)


def test_truncation_is_reported_in_words_that_fit_queries_and_documents(caplog):
    encoder = tiny_encoder(k=1, max_length=32)
    long_text = " ".join(["word"] * 100)
    with caplog.at_level("WARNING", logger="htp_embed.encoder"):
        encoder.encode_queries([long_text, "fish swam"])
    assert "1 of 2 queries exceeded max_length=32" in caplog.text
    assert "their vectors stand for their beginning only" in caplog.text
    assert "split long documents" not in caplog.text  # advice for documents, not for a query
    caplog.clear()
    with caplog.at_level("WARNING", logger="htp_embed.encoder"):
        encoder.encode_documents([long_text])
    assert "1 of 1 texts exceeded max_length=32" in caplog.text and "split long documents" in caplog.text


@pytest.mark.parametrize("config", [{"k": 1, "max_length": 32}, {"k": "adaptive:2", "max_length": 40},
                                    {"method": "echo", "max_length": 48}, {"method": "vanilla", "max_length": 24}])
def test_whether_a_query_is_cut_is_known_without_embedding_it(config):
    import random

    encoder = tiny_encoder(**config)
    words = ["fish", "swam", ".", "the", "cat", "sat", "!", "é", "日本", "?"]
    rng = random.Random(0)
    answers = []
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        exact = encoder.layouts([text], is_query=True)[0].truncated
        assert encoder.truncates_query(text) == exact, text
        answers.append(exact)
    assert any(answers) and not all(answers)  # both cases were met


def test_a_cached_model_copy_is_written_once_when_two_first_runs_race(tmp_path):
    """Two processes' first runs converted the packaged model at once; the second to finish
    deleted the first one's copy while that one wrote into it ('Directory not empty'). Under
    the lock the second finds the copy written and leaves it alone."""
    import threading
    import time

    from htp_embed.models import _copy_lock

    target = tmp_path / "models" / "gemma3-270m-bfloat16"
    asked, started = [], threading.Event()

    def first_run(delay: float) -> None:
        with _copy_lock(target) as missing:
            asked.append(missing)
            started.set()
            if missing:
                time.sleep(delay)  # the conversion
                target.mkdir(parents=True)
                (target / "config.json").write_text("{}")

    writer = threading.Thread(target=first_run, args=(0.3,))
    writer.start()
    started.wait(5)
    second = threading.Thread(target=first_run, args=(0.0,))
    second.start()
    writer.join(5)
    second.join(5)
    assert asked == [True, False]
    with _copy_lock(target) as missing:  # a complete copy: read without the lock
        assert missing is False
