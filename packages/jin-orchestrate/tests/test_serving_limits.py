"""Serving limits that must hold before any work: audio refused from its header, text that has no
UTF-8 form, and retry policies that could never send a request."""

import asyncio
import io
import json
import types

import httpx
import numpy as np
import pytest
import soundfile
from encoded import b64, wav

from jin_orchestrate.inference import ModelCard, card_decoder
from jin_orchestrate.serving import ServeConfig
from jin_orchestrate.serving.api import EmbedRequest, Item, Limits
from jin_orchestrate.serving.client import (
    AsyncEmbeddingClient,
    EmbeddingClient,
    RequestFailed,
    RetryPolicy,
)
from jin_orchestrate.serving.items import InputError, items_table

LIMITS = Limits(
    max_items=8, max_request_bytes=2**20, max_image_pixels=64 * 64, max_audio_seconds=2.0
)


@pytest.fixture(scope="module")
def card(checkpoint):
    return ModelCard.from_checkpoint(checkpoint)


class SpyDecoder:
    """The card's decoder, recording which rows it was handed audio for."""

    def __init__(self, card: ModelCard) -> None:
        self.decoder = card_decoder(card, on_error="skip")
        self.audio_rows: list[int] = []

    def decode(self, table):
        # Row i of the table is item i.
        present = table["audio"].is_valid().to_pylist()
        self.audio_rows += [i for i, p in enumerate(present) if p]
        return self.decoder.decode(table)


def encoded(seconds: float, rate: int, channels: int = 1, fmt: str = "FLAC", sub: str = "PCM_16"):
    """``seconds`` of silence (the most compressible audio) as an encoded file."""
    out = io.BytesIO()
    frames, block = round(seconds * rate), np.zeros((4800, channels), np.float32)
    with soundfile.SoundFile(out, "w", rate, channels, format=fmt, subtype=sub) as f:
        # In blocks: libsndfile's Vorbis encoder segfaults on one write of a minute of audio.
        for start in range(0, frames, len(block)):
            f.write(block[: frames - start])
    return out.getvalue()


def run(card, items, decoder=None):
    decoder = decoder or SpyDecoder(card)
    return items_table([Item(**i) for i in items], card, LIMITS, decoder, "items")


def refused(card, items):
    """Status, ``{loc: msg}`` and the rows whose audio reached the decoder."""
    spy = SpyDecoder(card)
    with pytest.raises(InputError) as info:
        run(card, items, spy)
    return info.value.status, {tuple(d.loc): d.msg for d in info.value.details}, spy.audio_rows


@pytest.mark.parametrize(
    ("fmt", "sub"),
    [("FLAC", "PCM_16"), ("WAV", "PCM_16"), ("OGG", "VORBIS")],
    ids=["flac", "wav-pcm16-fast-path", "ogg-vorbis"],
)
def test_audio_over_the_time_limit_is_refused_from_its_header_unread(card, fmt, sub):
    long_clip = encoded(60, 48000, fmt=fmt, sub=sub)
    fine_clip = encoded(1.5, 48000, fmt=fmt, sub=sub)
    if fmt == "WAV":  # the canonical 44-byte header that jin-data reads without libsndfile
        assert long_clip[36:40] == b"data"
    status, errors, decoded = refused(
        card,
        [
            {"modality": "audio", "data": b64(long_clip)},
            {"modality": "audio", "data": b64(fine_clip)},
        ],
    )
    assert status == 413
    assert errors == {
        ("body", "items", 0, "data"): "audio: 60.0 s is over the limit of 2 s (max_audio_seconds)"
    }
    assert decoded == [1], "the clip over the limit reached the decoder"
    table = run(card, [{"modality": "audio", "data": b64(fine_clip)}])
    assert len(table["audio_wave"][0].as_py()) == 1.5 * card.spec("audio").sample_rate


def test_a_flac_bomb_far_below_the_body_limit_is_refused_unread(card):
    bomb = encoded(30 * 60, 48000)  # 30 min: 0.26 MiB of FLAC, 330 MiB as float32
    assert len(b64(bomb)) < LIMITS.max_request_bytes
    status, errors, decoded = refused(card, [{"modality": "audio", "data": b64(bomb)}])
    assert status == 413
    assert "1800.0 s is over the limit of 2 s" in errors[("body", "items", 0, "data")]
    assert decoded == []


def test_audio_of_many_channels_is_refused_from_its_header_unread(card):
    # 1 s, within max_audio_seconds, but 32 channels: the decoder would hold 32 s of samples.
    clip = encoded(1.0, 48000, channels=32, fmt="OGG", sub="VORBIS")
    status, errors, decoded = refused(card, [{"modality": "audio", "data": b64(clip)}])
    assert status == 413
    assert errors[("body", "items", 0, "data")] == (
        "audio: 32 channels of 48000 frames (48000 Hz) is over the limit of 768000 samples "
        "(2 s of 8 channels at 48 kHz; max_audio_seconds)"
    )
    assert decoded == []
    stereo = encoded(1.5, 44100, channels=2)
    table = run(card, [{"modality": "audio", "data": b64(stereo)}])
    assert len(table["audio_wave"][0].as_py()) == 1.5 * card.spec("audio").sample_rate


def test_audio_at_a_rate_that_needs_a_huge_resampling_filter_is_refused_unread(card):
    """A 4 KB WAV stating 5,000,011 Hz took 98 s and 4.5 GiB to resample to 16 kHz."""
    odd = encoded(2000 / 5_000_011, 5_000_011, fmt="WAV")
    assert len(odd) < 5000
    status, errors, decoded = refused(card, [{"modality": "audio", "data": b64(odd)}])
    assert status == 422
    assert errors == {
        ("body", "items", 0, "data"): "audio: a sample rate of 5000011 Hz does not resample to "
        "the model's 16000 Hz (ratio 16000/5000011, over 32768); use a common rate such as "
        "16000, 44100 or 48000 Hz"
    }
    assert decoded == []
    # An uncommon but real rate (NTSC-adjusted 44.056 kHz: ratio 2000/5507) is served.
    for fmt in ("WAV", "FLAC"):
        table = run(card, [{"modality": "audio", "data": b64(encoded(0.5, 44056, fmt=fmt))}])
        assert len(table["audio_wave"][0].as_py()) == 8000


def test_audio_whose_header_does_not_read_is_a_422_unread(card):
    unknown_length = bytearray(encoded(1.0, 16000))
    # STREAMINFO's last 36 bits of bytes 18..25 hold the total samples; 0 means "unknown".
    fields = int.from_bytes(unknown_length[18:26], "big") & ~((1 << 36) - 1)
    unknown_length[18:26] = fields.to_bytes(8, "big")
    status, errors, decoded = refused(
        card,
        [
            {"modality": "audio", "data": b64(b"RIFF....WAVE broken")},
            {"modality": "audio", "data": b64(bytes(unknown_length))},
            {"modality": "audio", "data": b64(wav(16000, 0))},
            {"modality": "audio", "data": b64(wav(100, 0))},
        ],
    )
    assert status == 422
    assert errors[("body", "items", 0, "data")].startswith("audio: does not decode: ")
    assert errors[("body", "items", 1, "data")] == (
        "audio: does not decode: the header does not give the clip's length"
    )
    assert "100 samples at 16000 Hz" in errors[("body", "items", 3, "data")]
    assert len(errors) == 3
    assert decoded == [2, 3]


LONE_SURROGATES = '{"items": [{"modality": "text", "data": "fine \\ud83d\\ude00"}, \
{"modality": "text", "data": "abc\\ud800"}, {"modality": "text", "data": "\\udc00"}]}'


def test_text_with_a_lone_surrogate_is_a_422_naming_the_item(card):
    # Parsed as FastAPI parses a body: json.loads keeps a lone surrogate, joins a pair.
    request = EmbedRequest.model_validate(json.loads(LONE_SURROGATES))
    with pytest.raises(InputError) as info:
        items_table(request.items, card, LIMITS, card_decoder(card, on_error="skip"), "items")
    assert info.value.status == 422
    assert {tuple(d.loc): d.msg for d in info.value.details} == {
        ("body", "items", 1, "data"): "text: not valid Unicode: a lone surrogate '\\ud800' at "
        "character 3 (JSON \\uD800-\\uDFFF escapes must come in high-low pairs)",
        ("body", "items", 2, "data"): "text: not valid Unicode: a lone surrogate '\\udc00' at "
        "character 0 (JSON \\uD800-\\uDFFF escapes must come in high-low pairs)",
    }
    table = items_table(
        request.items[:1], card, LIMITS, card_decoder(card, on_error="skip"), "items"
    )
    assert table["text"].to_pylist() == ["fine \U0001f600"]


class _Remote:
    """A handle method: ``remote`` gives a cancellable awaitable, like a DeploymentResponse.

    ``fail`` makes the replica answer an exception instead, or never answer (``"hang"``).
    """

    def __init__(self, value) -> None:
        self.value = value
        self.fail: Exception | str | None = None
        self.calls: list[asyncio.Task] = []

    async def _answer(self):
        if self.fail == "hang":
            await asyncio.sleep(3600)
        if isinstance(self.fail, Exception):
            raise self.fail
        return self.value

    def remote(self, *args):
        self.calls.append(asyncio.ensure_future(self._answer()))
        return self.calls[-1]


def ingress_client(card, monkeypatch, remote=None, **cfg):
    """The ingress's own FastAPI app, its replica object made here instead of by Serve; the model
    deployment's ``card`` is ``remote`` (a :class:`_Remote`)."""
    from fastapi.testclient import TestClient
    from ray import serve

    from jin_orchestrate.serving.app import Ingress, app

    # Serve's ASGI wrapper subclasses the class as written; that one builds without a replica.
    ingress_class = Ingress.func_or_class.__bases__[0]
    assert ingress_class.__qualname__ == "Ingress"
    replica = ingress_class(
        types.SimpleNamespace(card=remote or _Remote(card)),
        ServeConfig(checkpoint="unused", **cfg),
    )
    context = types.SimpleNamespace(servable_object=replica)
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return TestClient(app, raise_server_exceptions=False)


def test_a_lone_surrogate_is_a_422_over_http(card, monkeypatch):
    with ingress_client(card, monkeypatch) as client:
        embed = client.post(
            "/v1/embed",
            content='{"items": [{"modality": "text", "data": "abc\\ud800"}]}',
            headers={"content-type": "application/json"},
        )
        similarity = client.post(
            "/v1/similarity",
            content='{"queries": [{"modality": "text", "data": "a"}], '
            '"candidates": [{"modality": "text", "data": "\\udfff"}]}',
            headers={"content-type": "application/json"},
        )
    assert embed.status_code == 422, embed.text
    assert [d["loc"] for d in embed.json()["detail"]] == [["body", "items", 0, "data"]]
    assert "lone surrogate '\\ud800'" in embed.json()["detail"][0]["msg"]
    assert similarity.status_code == 422, similarity.text
    assert [d["loc"] for d in similarity.json()["detail"]] == [["body", "candidates", 0, "data"]]


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b'{"items": [{"modality": "text", "data": "caf\xe9"}]}', "UnicodeDecodeError"),
        (b'{"items": [{"modality": "seven_segment", "data": [' + b"9" * 5000 + b"]}]}", "digits"),
        (
            b'{"items": [{"modality": "text", "data": ' + b"[" * 10**5 + b"]" * 10**5 + b"}]}",
            "Recursion",
        ),
    ],
    ids=["invalid-utf8", "5000-digit-integer", "deep-nesting"],
)
def test_a_body_json_cannot_parse_is_a_located_422(card, monkeypatch, body, cause):
    """Not FastAPI's own 400 with a string ``detail``: malformed JSON is a 422 of the one shape."""
    with ingress_client(card, monkeypatch) as client:
        response = client.post(
            "/v1/embed", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert (detail["loc"], detail["type"]) == (["body"], "json_invalid")
    assert detail["msg"].startswith("JSON decode error: ") and cause in detail["msg"]


@pytest.mark.parametrize(
    ("item", "loc"),
    [
        ({"modality": "seven_segment", "data": [1.0, "1.5", *[0.0] * 12]}, ["list[float]", 1]),
        ({"modality": "seven_segment", "data": [True, *[0.0] * 13]}, ["list[float]", 0]),
        (
            {"modality": "points", "data": [[0.0, 0.0, 0.0], [1.0, "2", 3.0]]},
            ["list[list[float]]", 1, 1],
        ),
        ({"modality": "points", "data": [[0.0, False, 0.0]]}, ["list[list[float]]", 0, 1]),
    ],
    ids=["string-in-vector", "bool-in-vector", "string-in-points", "bool-in-points"],
)
def test_strings_and_booleans_are_not_numbers(card, monkeypatch, item, loc):
    """pydantic's lax mode read "1.5" as 1.5 and true as 1.0 and embedded them; a 422 names the
    item and the index instead."""
    with ingress_client(card, monkeypatch) as client:
        response = client.post("/v1/embed", json={"items": [item]})
        similarity = client.post("/v1/similarity", json={"queries": [item], "candidates": [item]})
    assert response.status_code == 422, response.text
    locs = [d["loc"] for d in response.json()["detail"]]
    assert ["body", "items", 0, "data", *loc] in locs, locs
    assert similarity.status_code == 422, similarity.text


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        (["1"] * 200_000, ["list[float]", 0]),
        ([0.5] * 200_000 + ["x"], ["list[float]", 200_000]),
        ([[0.0, 0.0, 0.0]] * 100_000 + [[0.0, "x", 0.0]], ["list[list[float]]", 100_000, 1]),
    ],
    ids=["all-strings", "last-a-string", "last-row-a-string"],
)
def test_a_long_list_of_bad_numbers_is_one_error_not_one_per_number(card, monkeypatch, data, loc):
    """pydantic listed every bad number under every member of the union: 200,000 strings gave
    400,001 details (a 20 MiB answer; a 15.7 MiB body made 6.6 million errors and 4.8 GiB)."""
    with ingress_client(card, monkeypatch) as client:
        response = client.post("/v1/embed", json={"items": [{"modality": "points", "data": data}]})
    assert response.status_code == 422, response.text[:500]
    locs = [d["loc"] for d in response.json()["detail"]]
    assert len(locs) <= 3 and ["body", "items", 0, "data", *loc] in locs, locs[:5]
    assert len(response.content) < 2000


def test_a_list_of_items_over_max_items_is_a_413_before_its_items_validate(card, monkeypatch):
    """Each bad item of a long list made errors of its own before the item count was checked (16
    MiB of ``{}`` items: 11 million errors, out of memory): a list over ``max_items`` (64 here) is
    refused first, and a request's total still counts queries and candidates together."""
    text = {"modality": "text", "data": "a"}
    with ingress_client(card, monkeypatch) as client:
        embed = client.post("/v1/embed", json={"items": [{}] * 200_000})
        one_list = client.post("/v1/similarity", json={"queries": [text], "candidates": [{}] * 65})
        total = client.post(
            "/v1/similarity", json={"queries": [text] * 40, "candidates": [text] * 40}
        )
        within = client.post("/v1/embed", json={"items": [{}] * 64})
    for response, loc, count in (
        (embed, ["body", "items"], 200_000),
        (one_list, ["body", "candidates"], 65),
        (total, ["body"], 80),
    ):
        assert response.status_code == 413, response.text[:500]
        [detail] = response.json()["detail"]
        assert (detail["loc"], detail["type"]) == (loc, "too_large")
        assert detail["msg"].startswith(f"{count} items is over the limit of 64"), detail
    # Under the limit every bad item is still named.
    assert within.status_code == 422
    assert {tuple(d["loc"][:3]) for d in within.json()["detail"]} == {
        ("body", "items", i) for i in range(64)
    }


def test_json_integers_are_numbers(card):
    request = EmbedRequest.model_validate_json(
        '{"items": [{"modality": "seven_segment", "data": [1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, '
        '0, 3]}, {"modality": "points", "data": [[0, 1, 2], [3, 4.5, 5]]}]}'
    )
    table = items_table(request.items, card, LIMITS, card_decoder(card, on_error="skip"), "items")
    assert table["seven_segment"].to_pylist()[0] == [1.0, 0, 2, *[0.0] * 10, 3]
    assert np.asarray(table["points"][1].as_py()).tolist() == [[0, 1, 2], [3, 4.5, 5]]


def test_every_error_answer_has_the_documented_shape(card, monkeypatch):
    with ingress_client(card, monkeypatch) as client:
        wrong_method = client.get("/v1/embed")
        unknown_path = client.get("/v2/embed")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {
        "detail": [{"loc": [], "msg": "Method Not Allowed", "type": "http_error"}]
    }
    assert unknown_path.status_code == 404
    assert unknown_path.json()["detail"] == [{"loc": [], "msg": "Not Found", "type": "http_error"}]


def test_healthz_asks_the_model_replica_each_time_and_is_a_503_when_none_answers(card, monkeypatch):
    """The ingress kept the card of the first answer, so /healthz stayed 200 while the only model
    replica was dead (and /v1/embed answered 503)."""
    from ray.exceptions import ActorDiedError

    remote = _Remote(card)
    with ingress_client(card, monkeypatch, remote, health_timeout_s=0.2) as client:
        up = client.get("/healthz")
        remote.fail = ActorDiedError()
        dead = client.get("/healthz")
        remote.fail = "hang"
        hung = client.get("/healthz")
        remote.fail = None
        back = client.get("/healthz")
    assert up.status_code == 200 and up.json() == {"status": "ok", "model_version": card.version}
    assert dead.status_code == 503 and hung.status_code == 503
    assert dead.json()["detail"] == [
        {
            "loc": [],
            "msg": "the model deployment (Embedder) is not reachable: ActorDiedError: "
            + str(ActorDiedError()),
            "type": "unavailable",
        }
    ]
    assert hung.json()["detail"] == [
        {
            "loc": [],
            "msg": "the model deployment (Embedder) did not answer within 0.2 s (health_timeout_s)",
            "type": "unavailable",
        }
    ]
    assert back.status_code == 200
    assert len(remote.calls) == 4 and remote.calls[2].cancelled(), "the hung call was left queued"


def _client_errors(error: type[Exception]):
    """A transport whose every attempt fails with ``error``, and the attempts it saw."""
    calls = []

    def answer(request):
        calls.append(1)
        raise error("failed", request=request)

    return httpx.MockTransport(answer), calls


@pytest.mark.parametrize(
    ("error", "attempts"),
    [
        ("ConnectError", 3),
        ("ReadTimeout", 3),
        ("RemoteProtocolError", 3),
        ("LocalProtocolError", 1),
    ],
)
def test_the_client_retries_transport_errors_a_retry_can_fix(error, attempts):
    policy = RetryPolicy(attempts=3, backoff_s=0.0)
    transport, calls = _client_errors(getattr(httpx, error))
    client = EmbeddingClient("http://jin.test", policy, transport=transport)
    with client, pytest.raises(RequestFailed) as info:
        client.embed([{"modality": "text", "data": "x"}])
    assert (len(calls), info.value.attempts, info.value.status) == (attempts, attempts, None)

    async def embed_async():
        transport, calls = _client_errors(getattr(httpx, error))
        async with AsyncEmbeddingClient("http://jin.test", policy, transport=transport) as client:
            with pytest.raises(RequestFailed):
                await client.embed([{"modality": "text", "data": "x"}])
        return len(calls)

    assert asyncio.run(embed_async()) == attempts


def test_a_url_without_its_scheme_fails_at_once():
    client = EmbeddingClient("127.0.0.1:8000", RetryPolicy(backoff_s=0.0))
    with client, pytest.raises(RequestFailed, match=r"not retried.*UnsupportedProtocol") as info:
        client.embed([{"modality": "text", "data": "x"}])
    assert info.value.attempts == 1


@pytest.mark.parametrize(
    ("field", "bad", "least"),
    [
        ("attempts", 0, 1),
        ("attempts", -2, 1),
        ("backoff_s", -0.5, 0.0),
        ("max_backoff_s", float("nan"), 0.0),
        ("timeout_s", 0.0, 0.001),
    ],
)
def test_a_retry_policy_out_of_range_is_refused_naming_the_field(field, bad, least):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        RetryPolicy(**{field: bad})
    assert getattr(RetryPolicy(**{field: least}), field) == least
