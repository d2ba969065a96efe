"""An encoder's identity round-trips: record -> config -> encoder -> the same record."""

from __future__ import annotations

import json

import pytest
from tiny_decoder import tiny_encoder

from htp_embed import METHODS, EncoderIdentity, HTPEncoder, config_from_identity
from htp_embed.methods import method_for
from indexes import same_encoder

# Records as the first release wrote them, before attention_sink existed.
OLD_HTP_RECORD = {
    "model": "gemma3-270m", "model_fingerprint": "0123456789abcdef", "method": "htp", "dim": 640,
    "exit_layer": 13, "max_length": 512, "query_instruction": "Retrieve relevant document. Text: ",
    "rewire": [1, 7], "k": "adaptive:8", "segmenter": "senter", "global_tokens": True, "local_tokens": True,
}
OLD_VANILLA_RECORD = {
    "model": "smollm2-135m", "model_fingerprint": "fedcba9876543210", "method": "vanilla", "dim": 576,
    "exit_layer": None, "max_length": 256, "query_instruction": "",
}


def rebuilt(encoder: HTPEncoder) -> HTPEncoder:
    """The encoder an index reopens: built from the recorded identity alone, on the same weights."""
    config = config_from_identity(encoder.identity(), show_progress=False)
    return HTPEncoder(config, decoder=encoder.model, tokenizer=encoder.tokenizer)


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_reopens_as_the_same_encoder(method, bos):
    encoder = tiny_encoder(bos=bos, method=method)
    assert rebuilt(encoder).identity() == encoder.identity()


@pytest.mark.parametrize(
    "settings",
    [
        {"k": 3},
        {"k": "adaptive:5"},
        {"local_tokens": False},
        {"global_tokens": False},
        {"attention_sink": "off"},
        {"exit_layer": -2, "rewire_start": 0, "rewire_stop": 2},
        {"exit_layer": 2},  # rewiring past the exit is clipped, and recorded clipped
        {"max_length": 64, "query_instruction": "Query: "},
    ],
)
def test_htp_settings_reopen_as_the_same_encoder(settings):
    encoder = tiny_encoder(bos=False, method="htp", **settings)
    again = rebuilt(encoder)
    assert again.identity() == encoder.identity()
    assert again.sink_token == encoder.sink_token and again.describe() == encoder.describe()


def test_a_sink_token_is_recorded_only_when_used():
    assert "attention_sink" in tiny_encoder(bos=False, method="tp").identity()
    assert "attention_sink" not in tiny_encoder(bos=True, method="tp").identity()
    assert "attention_sink" not in tiny_encoder(bos=False, method="echo").identity()


@pytest.mark.parametrize("record", [OLD_HTP_RECORD, OLD_VANILLA_RECORD])
def test_records_written_before_the_model_read_back_unchanged(record):
    again = EncoderIdentity.from_record(record).record()
    assert again == record
    assert json.dumps(again) == json.dumps(record)  # key order too: manifests are diffed by eye


def test_a_record_without_attention_sink_reopens_without_one():
    config = config_from_identity(OLD_HTP_RECORD, device="cpu")
    assert config.attention_sink == "off"
    assert (config.rewire_start, config.rewire_stop, config.exit_layer) == (1, 7, 13)
    assert str(config.k) == "adaptive:8" and config.device == "cpu"


def test_a_recorded_identity_is_that_encoders_typed_identity():
    encoder = tiny_encoder(bos=False)
    assert EncoderIdentity.from_record(encoder.identity()) == encoder.encoder_identity()


def test_same_encoder_ignores_key_order_and_list_or_tuple():
    shuffled = dict(reversed(OLD_HTP_RECORD.items()))
    assert same_encoder(OLD_HTP_RECORD, {**shuffled, "rewire": (1, 7)})
    assert not same_encoder(OLD_HTP_RECORD, {**OLD_HTP_RECORD, "k": "adaptive:4"})
    assert not same_encoder(OLD_HTP_RECORD, {**OLD_HTP_RECORD, "attention_sink": 2})
    assert not same_encoder(OLD_HTP_RECORD, OLD_VANILLA_RECORD)


def test_records_are_written_in_one_canonical_form():
    # so comparing them as JSON (indexes.same_encoder) is the whole comparison
    spelled = EncoderIdentity.from_record({**OLD_HTP_RECORD, "k": "adaptive", "rewire": (1, 7)})
    assert spelled.record() == EncoderIdentity.from_record(OLD_HTP_RECORD).record()


def test_every_configurable_method_has_a_strategy():
    assert [method_for(name).name for name in METHODS] == list(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        method_for("mean")


def _resolved(record, overrides=None, **encoder_settings):
    from types import SimpleNamespace

    from pipelines.engine import resolve_encoder
    from pipelines.settings import Settings

    settings = Settings(encoder=encoder_settings) if encoder_settings else Settings()
    return resolve_encoder(SimpleNamespace(encoder=record), settings, overrides)


def test_an_encoder_onto_another_model_or_method_takes_their_defaults_not_the_records():
    """A Gemma HTP index records no sink token (its tokenizer adds BOS) and its layers. Rebuilt
    onto SmolLM2 (option or environment), the record's "no sink" and Gemma's layers were kept:
    HTP on SmolLM2 without the sink it needs. So was a vanilla SmolLM2 index rebuilt as htp."""
    for onto in (_resolved(OLD_HTP_RECORD, {"model": "smollm2-135m"}),
                 _resolved(OLD_HTP_RECORD, model="smollm2-135m")):  # HTP_INDEX_ENCODER__MODEL
        assert onto.model == "smollm2-135m" and onto.attention_sink == "auto"
        assert (onto.rewire_start, onto.rewire_stop, onto.exit_layer) == (None, None, "default")
        assert onto.k == config_from_identity(OLD_HTP_RECORD).k  # not per model: kept
    given = _resolved(OLD_HTP_RECORD, {"model": "smollm2-135m", "exit_layer": 20, "attention_sink": "off"})
    assert (given.exit_layer, given.attention_sink, given.rewire_start) == (20, "off", None)
    as_htp = _resolved(OLD_VANILLA_RECORD, {"method": "htp"})
    assert as_htp.attention_sink == "auto" and as_htp.model == "smollm2-135m"
    # the same model and method: the record as it is (an old index without a sink reopens so)
    same = _resolved(OLD_HTP_RECORD, {"model": "gemma3-270m"})
    assert (same.attention_sink, same.rewire_start, same.rewire_stop, same.exit_layer) == ("off", 1, 7, 13)


def test_a_record_with_a_fingerprint_and_a_method_but_no_exit_layer_is_no_htp_index_encoder(tmp_path):
    # it passed the check (only model_fingerprint and method were looked for) and ingest then
    # failed on "invalid EncoderIdentity setting: exit_layer: Field required; ..."
    from pipelines.identity_check import NotAnEncoderRecordError, require_encoder_record

    made_up = {"model": "synthetic", "dim": 8, "method": "htp", "model_fingerprint": "made-up"}
    with pytest.raises(NotAnEncoderRecordError) as caught:
        require_encoder_record(tmp_path, made_up)
    message = str(caught.value)
    assert "records an encoder with no exit_layer" in message and "not written by an htp-index encoder" in message
    assert "Field required" not in message
    require_encoder_record(tmp_path, OLD_HTP_RECORD)  # every record htp-index wrote still reads
    require_encoder_record(tmp_path, tiny_encoder().identity())
