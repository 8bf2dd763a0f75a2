"""Request items -> decoded table; every client mistake located; the serving config and its file."""

import importlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from encoded import b64, png, wav

from jin_orchestrate.inference import ModelCard, card_decoder
from jin_orchestrate.serve import load_serve_config
from jin_orchestrate.serving import ServeConfig
from jin_orchestrate.serving.api import Item, Limits
from jin_orchestrate.serving.items import InputError, items_table

CONFIG_FILE = Path(__file__).parents[1] / "serve_config.yaml"
LIMITS = Limits(
    max_items=8, max_request_bytes=2**20, max_image_pixels=64 * 64, max_audio_seconds=2.0
)


@pytest.fixture(scope="module")
def card(checkpoint):
    return ModelCard.from_checkpoint(checkpoint)


def table_of(card, items, field="items"):
    return items_table(
        [Item(**i) for i in items], card, LIMITS, card_decoder(card, on_error="skip"), field
    )


def errors_of(card, items, field="items"):
    with pytest.raises(InputError) as info:
        table_of(card, items, field)
    return info.value.status, {tuple(d.loc): d.msg for d in info.value.details}


def test_items_become_one_decoded_row_each(card):
    table = table_of(
        card,
        [
            {"modality": "text", "data": "the number 42"},
            {"modality": "image", "data": b64(png(20, 30, 0))},
            {"modality": "audio", "data": b64(wav(1600, 0))},
            {"modality": "points", "data": [[0, 0, 0], [1, 2, 3]]},
            {"modality": "seven_segment", "data": [0.5] * 14},
        ],
    )
    assert table.num_rows == 5
    assert table["text"].to_pylist()[0] == "the number 42"
    assert table["image_shape"].to_pylist()[1] == [1, 20, 30]
    assert len(table["audio_wave"][2].as_py()) == 1600
    assert np.asarray(table["points"][3].as_py()).shape == (2, 3)
    assert table["seven_segment"].to_pylist()[4] == [0.5] * 14
    assert table["seven_segment"].null_count == 4


def test_every_bad_item_is_named_by_index_and_field(card):
    status, errors = errors_of(
        card,
        [
            {"modality": "text", "data": "fine"},
            {"modality": "smell", "data": "x"},
            {"modality": "text", "data": [1.0]},
            {"modality": "image", "data": "not base64!"},
            {"modality": "image", "data": b64(b"GIF? no")},
            {"modality": "points", "data": [[0.0, 1.0]]},
            {"modality": "seven_segment", "data": [0.0] * 13},
            {"modality": "seven_segment", "data": [float("nan")] * 14},
        ],
    )
    assert status == 422
    assert set(errors) == {("body", "items", i, k) for i, k in [(1, "modality")]} | {
        ("body", "items", i, "data") for i in (2, 3, 4, 5, 6, 7)
    }
    assert "unknown modality 'smell'" in errors[("body", "items", 1, "modality")]
    assert "seven_segment" in errors[("body", "items", 1, "modality")]
    assert "text: expected a string" in errors[("body", "items", 2, "data")]
    assert "not valid base64" in errors[("body", "items", 3, "data")]
    assert "not an image file" in errors[("body", "items", 4, "data")]
    assert "rows of 3 numbers, received lengths [2]" in errors[("body", "items", 5, "data")]
    assert "expected 14 numbers, received 13" in errors[("body", "items", 6, "data")]
    assert "NaN, Inf" in errors[("body", "items", 7, "data")]


def test_values_beyond_float32_are_refused(card):
    _, errors = errors_of(card, [{"modality": "points", "data": [[1e39, 0, 0]]}], "queries")
    assert "NaN, Inf or beyond" in errors[("body", "queries", 0, "data")]


def test_audio_that_does_not_decode_or_is_too_short(card):
    status, errors = errors_of(
        card,
        [
            {"modality": "audio", "data": b64(b"RIFF....WAVE broken")},
            {"modality": "audio", "data": b64(wav(100, 0))},
        ],
    )
    assert status == 422
    assert "audio" in errors[("body", "items", 0, "data")]
    assert "100 samples at 16000 Hz" in errors[("body", "items", 1, "data")]
    assert "at least 160 (10 ms)" in errors[("body", "items", 1, "data")]


def test_items_over_the_size_limits_answer_413(card):
    status, errors = errors_of(
        card,
        [
            {"modality": "image", "data": b64(png(65, 64, 0))},
            {"modality": "audio", "data": b64(wav(16000 * 3, 0))},
        ],
    )
    assert status == 413
    assert "64x65 pixels is over the limit of 4096" in errors[("body", "items", 0, "data")]
    assert "3.0 s is over the limit of 2 s" in errors[("body", "items", 1, "data")]


def test_an_image_pillow_refuses_as_a_bomb_is_a_413_naming_the_limit(card):
    """Over twice Pillow's MAX_IMAGE_PIXELS its own check raises as the header is read: that was
    a 422 "image: does not decode", not the 413 of every other image over max_image_pixels."""
    data = bytearray(png(8, 8, 0))
    data[16:24] = struct.pack(">II", 15000, 15000)  # IHDR's width and height; the pixels unread
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    status, errors = errors_of(card, [{"modality": "image", "data": b64(bytes(data))}])
    assert status == 413
    assert errors[("body", "items", 0, "data")].startswith(
        "image: over the limit of 4096 pixels (max_image_pixels): Image size (225000000 pixels)"
    )


def test_serve_config_rejects_unknown_keys_and_unfillable_batches():
    with pytest.raises(ValueError, match=r"unknown key 'max_batch'.*did you mean 'max_batch_size'"):
        ServeConfig(checkpoint="x", max_batch=4)
    with pytest.raises(ValueError, match=r"model\.max_ongoing_requests: 8 is below max_batch_size"):
        ServeConfig.model_validate(
            {"checkpoint": "x", "max_batch_size": 16, "model": {"max_ongoing_requests": 8}}
        )
    with pytest.raises(ValueError, match=r"max_batch_items: 8 is below max_items \(16\)"):
        ServeConfig(checkpoint="x", max_items=16, max_batch_items=8)
    cfg = ServeConfig(checkpoint="x", max_batch_size=24)
    assert cfg.model_options(num_gpus=1) == {
        "num_replicas": 1,
        "max_ongoing_requests": 48,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1},
    }


def test_the_serve_config_file_builds_a_valid_config():
    import yaml

    cfg, http = load_serve_config(CONFIG_FILE, "/ckpt", ["max_batch_size=8"])
    assert cfg.checkpoint == "/ckpt" and cfg.max_batch_size == 8
    assert http == {"host": "127.0.0.1", "port": 8000}
    assert cfg.ingress.autoscaling_config["max_replicas"] == 4
    app = yaml.safe_load(CONFIG_FILE.read_text())["applications"][0]
    module, _, name = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    with pytest.raises(ValueError, match="no checkpoint"):
        load_serve_config(None, None, [])


def test_a_partial_deployment_section_keeps_its_default_cpus():
    """``--set`` of one deployment option creates a section holding only that option: the rest
    are the deployment's defaults, its CPU share included, not `DeploymentConfig`'s."""
    cfg, _ = load_serve_config(
        None, "/ckpt", ["model.max_ongoing_requests=64", "ingress.ray_actor_options.num_gpus=0"]
    )
    assert cfg.model.max_ongoing_requests == 64
    assert cfg.model.ray_actor_options == {"num_cpus": 1}
    assert cfg.ingress.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0}
    cfg, _ = load_serve_config(None, "/ckpt", ["model.ray_actor_options.num_cpus=4"])
    assert cfg.model.ray_actor_options == {"num_cpus": 4}


def test_the_cli_refuses_a_missing_or_damaged_checkpoint_before_starting_ray(
    checkpoint, tmp_path, capsys
):
    import shutil

    from jin_orchestrate.serve import main

    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "neither a directory nor an MLflow URI" in capsys.readouterr().err
    damaged = shutil.copytree(checkpoint, tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes(b"garbage")
    assert main(["--checkpoint", str(damaged)]) == 2
    assert "model.safetensors does not match its sha256" in capsys.readouterr().err


def test_the_cli_refuses_a_port_it_cannot_listen_on_before_starting_ray(
    checkpoint, monkeypatch, capsys
):
    """A port in use (a second service on 8000) or out of range failed in Serve's proxy after
    Ray had started, some 15 s later, with Ray's traceback and exit status 1."""
    import socket

    import jin_orchestrate.cluster
    from jin_orchestrate.serve import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(jin_orchestrate.cluster, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--checkpoint", str(checkpoint), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another "
        "--port\n"
    )
    assert main(["--checkpoint", str(checkpoint), "--port", "99999"]) == 2
    assert capsys.readouterr().err == "error: port 99999 is not a TCP port (1-65535)\n"


def test_forward_passes_hold_whole_requests_in_order_within_the_item_limit():
    from jin_orchestrate.serving.app import forward_passes

    def runs(sizes, limit):
        return [sizes[p] for p in forward_passes(sizes, limit)]

    assert runs([3, 4, 5, 1, 2], None) == [[3, 4, 5, 1, 2]]
    assert runs([3, 4, 5, 1, 2], 8) == [[3, 4], [5, 1, 2]]
    assert runs([3, 4, 5, 1, 2], 7) == [[3, 4], [5, 1], [2]]
    assert runs([8, 8, 8], 8) == [[8], [8], [8]]
    assert runs([9, 1], 8) == [[9], [1]]  # a request over the limit alone (the ingress stops it)
    assert runs([1] * 5, 100) == [[1] * 5]
