"""Collation against a row-by-row reference: padding, masks, presence, zero-copy, slicing."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

from jin_data import Decoder, collate, write_dataset
from jin_data.reader import list_shards


@pytest.fixture
def decoded(dataset) -> pa.Table:
    fs, shards = list_shards(dataset)
    import pyarrow.parquet as pq

    table = pa.concat_tables(pq.read_table(fs.open(s.path, "rb")) for s in shards)
    return Decoder().decode(table.slice(3, 25))[0]  # a slice: offsets must be honoured


def test_layout_matches_conventions(decoded, samples):
    batch = collate(decoded)
    rows = samples[3:28]
    b = len(rows)
    assert batch["id"] == [s["id"] for s in rows]
    assert batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [-1 if s["label"] is None else s["label"] for s in rows]
    for modality in ("text", "image", "audio", "points", "custom"):
        present = batch[f"{modality}_present"]
        assert present.dtype == torch.bool and present.shape == (b,)
        assert present.tolist() == [s[modality] is not None for s in rows]
    assert batch["text_bytes"].dtype == torch.uint8 and batch["image"].dtype == torch.uint8
    assert batch["audio"].dtype == torch.float32 and batch["points"].dtype == torch.float32
    assert batch["image"].shape[:2] == (b, 1) and batch["image_sizes"].dtype == torch.int64


def test_ragged_columns_padded_with_masks_true_at_padding(decoded, samples):
    batch = collate(decoded)
    for i, s in enumerate(samples[3:28]):
        text = (s["text"] or "").encode()
        assert batch["text"][i] == (s["text"] or "")
        assert bytes(batch["text_bytes"][i][~batch["text_padding_mask"][i]].tolist()) == text
        assert batch["text_bytes"][i][batch["text_padding_mask"][i]].eq(0).all()
        points = batch["points"][i][~batch["points_padding_mask"][i]]
        expected = s["points"] if s["points"] is not None else np.zeros((0, 4), np.float32)
        np.testing.assert_array_equal(points.numpy(), expected)
        length = int(batch["audio_lengths"][i])
        wave = s["audio"] if s["audio"] is not None else None
        if wave is None:
            assert length == 0
        elif isinstance(wave, np.ndarray):
            np.testing.assert_array_equal(batch["audio"][i, :length].numpy(), wave)
        assert batch["audio"][i, length:].eq(0).all()
        if s["image"] is not None:
            h, w = s["image"].shape
            assert batch["image_sizes"][i].tolist() == [h, w]
            np.testing.assert_array_equal(batch["image"][i, 0, :h, :w].numpy(), s["image"])
            assert (
                batch["image"][i, :, h:, :].eq(0).all() and batch["image"][i, :, :, w:].eq(0).all()
            )
        custom = s["custom"] if s["custom"] is not None else np.zeros(5, np.float32)
        np.testing.assert_array_equal(batch["custom"][i].numpy(), custom)


def test_fixed_size_numeric_columns_are_zero_copy(tmp_path):
    rows = [
        {"id": f"{i}", "custom": np.full(3, i, np.float32), "image": np.full((4, 4), i, np.uint8)}
        for i in range(6)
    ]
    write_dataset(rows, str(tmp_path / "z"))
    import pyarrow.parquet as pq

    table, _ = Decoder().decode(pq.read_table(tmp_path / "z" / "shard-00000.parquet"))
    batch = collate(table, ["custom", "image"])
    custom_buffer = table["custom"].chunk(0).values.buffers()[1]
    assert batch["custom"].data_ptr() == custom_buffer.address
    pixel_buffer = table["image_pixels"].chunk(0).values.buffers()[1]
    assert batch["image"].data_ptr() == pixel_buffer.address
    assert batch["image"].shape == (6, 1, 4, 4) and batch["image"][5].eq(5).all()


def test_grayscale_and_colour_in_one_batch_share_channels(tmp_path):
    colour = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    rows = [{"id": "g", "image": np.full((3, 2), 7, np.uint8)}, {"id": "c", "image": colour}]
    write_dataset(rows, str(tmp_path / "z"))
    import pyarrow.parquet as pq

    table, _ = Decoder().decode(pq.read_table(tmp_path / "z" / "shard-00000.parquet"))
    batch = collate(table, ["image"])
    assert batch["image"].shape == (2, 3, 3, 3)
    assert batch["image"][0, :, :3, :2].eq(7).all()
    np.testing.assert_array_equal(batch["image"][1, :, :2, :].numpy(), colour.transpose(2, 0, 1))


def test_asking_for_a_missing_modality_names_the_columns(decoded):
    with pytest.raises(ValueError, match=r"modality 'video': expected column 'video'"):
        collate(decoded, ["video"])


def test_absent_custom_vectors_round_trip_as_zeros(tmp_path):
    # Regression: pyarrow < 26 (MLflow's pin) cannot read a Parquet fixed_size_list with null rows.
    from jin_data import ShardDataset

    rows = [
        {"id": f"{i}", "custom": None if i % 2 else np.full(4, i, np.float32)} for i in range(6)
    ]
    write_dataset(rows, str(tmp_path / "z"))
    batch = next(iter(ShardDataset(str(tmp_path / "z"), batch_size=6, shuffle=False)))
    assert batch["custom"].shape == (6, 4)
    assert batch["custom_present"].tolist() == [True, False] * 3
    assert batch["custom"][1].eq(0).all() and batch["custom"][2].eq(2).all()


def test_wav_rows_match_libsndfile_and_the_resampler(dataset, samples):
    # Reference decode: libsndfile to float32, then the same polyphase resampler; the PCM fast
    # path (int16 views converted into the batch) must agree exactly.
    import io

    import soundfile

    from jin_data import ShardDataset
    from jin_data.decode import resample

    batch = next(iter(ShardDataset(dataset, batch_size=60, shuffle=False)))
    checked = 0
    for i, s in enumerate(samples):
        if not isinstance(s["audio"], bytes):
            continue
        wave, rate = soundfile.read(io.BytesIO(s["audio"]), dtype="float32")
        expected = resample(wave, rate, 16000)
        n = int(batch["audio_lengths"][i])
        assert n == len(expected)
        np.testing.assert_array_equal(batch["audio"][i, :n].numpy(), expected)
        assert batch["audio"][i, n:].eq(0).all()
        checked += 1
    assert checked >= 20


def test_int16_audio_is_the_float_waveform_in_pcm_units(dataset, samples):
    import io

    import soundfile

    from jin_data import ShardDataset

    floats = next(iter(ShardDataset(dataset, batch_size=60, shuffle=False)))
    pcm = next(iter(ShardDataset(dataset, batch_size=60, shuffle=False, audio_dtype="int16")))
    assert pcm["audio"].dtype == torch.int16 and pcm["audio"].shape == floats["audio"].shape
    expected = torch.clamp(torch.round(floats["audio"] * 32768), -32768, 32767)
    assert torch.equal(pcm["audio"].to(torch.float32), expected)
    # 16-bit WAV at the target rate arrives as its stored samples, untouched.
    s = samples[3]  # i // 2 % 3 == 1: PCM_16 at 16 kHz
    stored, _ = soundfile.read(io.BytesIO(s["audio"]), dtype="int16")
    np.testing.assert_array_equal(pcm["audio"][3, : len(stored)].numpy(), stored)
    with pytest.raises(ValueError, match="audio_dtype: expected 'float32' or 'int16'"):
        collate(
            Decoder().decode(pa.table({"id": ["a"], "split": ["t"], "label": [1]}))[0], [], "int8"
        )


def test_int16_audio_refuses_non_finite_samples_naming_the_row(tmp_path):
    # NaN and infinity have no 16-bit PCM value (a cast gave an arbitrary one, silently); values
    # beyond full scale are clipped. float32 keeps them all, for the model's own checks.
    from jin_data import DecodeError, ShardDataset

    buffer = io.BytesIO()
    soundfile.write(
        buffer, np.array([0.5, np.nan], np.float32), 16000, format="WAV", subtype="FLOAT"
    )
    waves = {
        "ok": [0.5, -0.25],
        "nan": [0.5, np.nan],
        "inf": [np.inf, 0.0],
        "-inf": [-np.inf, 0.0],
        "loud": [1.5, -2.0],
    }
    rows = [
        {"id": k, "audio": np.array(w, np.float32), "audio_sample_rate": 16000}
        for k, w in waves.items()
    ]
    url = str(tmp_path / "ds")
    write_dataset([*rows, {"id": "nan-wav", "audio": buffer.getvalue()}], url)

    def read(audio_dtype="int16", **options):
        data = ShardDataset(url, batch_size=8, shuffle=False, audio_dtype=audio_dtype, **options)
        (batch,) = data  # one batch: the whole epoch, so last_report is set
        return data, batch

    with pytest.raises(DecodeError, match=r"row=1 column='audio' id='nan'.*sample 1 of 2 is nan"):
        read()
    data, batch = read(on_error="skip")
    assert batch["id"] == ["ok", "loud"] and data.last_report.skipped_rows == 4
    assert batch["audio"].tolist() == [[16384, -8192], [32767, -32768]]
    assert torch.isnan(read(audio_dtype="float32")[1]["audio"]).any()  # float32: kept as stored
    decoded = Decoder().decode(pq.read_table(f"{url}/shard-00000.parquet"))[0]
    with pytest.raises(DecodeError, match=r"column='audio' id='nan'.* no 16-bit PCM value"):
        collate(decoded, ["audio"], "int16")  # the Ray path's collate function


def test_custom_is_b_by_f_also_when_no_row_of_the_batch_has_one(tmp_path):
    import pyarrow.parquet as pq

    from jin_data import ShardDataset

    rows = [
        {"id": f"{i}", "custom": np.full(4, i, np.float32) if i < 4 else None} for i in range(8)
    ]
    url = str(tmp_path / "z")
    write_dataset(rows, url)
    batches = list(ShardDataset(url, batch_size=4, shuffle=False))
    assert [tuple(b["custom"].shape) for b in batches] == [(4, 4), (4, 4)]
    assert batches[1]["custom"].eq(0).all() and not batches[1]["custom_present"].any()
    # The Ray Data path's collation: F from the decoded table's metadata (a shard's), or given.
    fs, [shard] = list_shards(url)
    table, _ = Decoder().decode(pq.read_table(fs.open(shard.path, "rb")))
    assert collate(table.slice(4), ["custom"])["custom"].shape == (4, 4)
    bare = table.replace_schema_metadata(None)
    assert collate(bare.slice(4), ["custom"], custom_dim=4)["custom"].shape == (4, 4)
    with pytest.raises(ValueError, match="custom: row 0 of the batch holds 4 values, expected F=3"):
        collate(bare, ["custom"], custom_dim=3)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", [None, "L", "RGB"])
def test_16_bit_grayscale_keeps_its_top_8_bits(mode):
    from jin_data.decode import decode_image

    wide = np.array([[0, 255, 256, 1000], [30000, 40000, 65280, 65535]], np.uint16)
    pixels = decode_image(_png(wide), mode)
    expected = (wide >> 8).astype(np.uint8)
    assert pixels.dtype == np.uint8
    assert pixels.shape == ((3,) if mode == "RGB" else (1,)) + wide.shape
    for channel in pixels:
        np.testing.assert_array_equal(channel, expected)


def test_grayscale_with_alpha_and_1_bit_keep_one_channel():
    from PIL import Image

    from jin_data.decode import decode_image

    gray = np.array([[0, 100], [200, 255]], np.uint8)
    for image in (Image.fromarray(gray).convert("LA"), Image.fromarray(gray > 127)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pixels = decode_image(buffer.getvalue(), None)
        assert pixels.shape == (1, 2, 2), image.mode
        reference = np.asarray(image.convert("L"))
        np.testing.assert_array_equal(pixels[0], reference)


def test_copy_gives_tensors_of_their_own(tmp_path):
    # For tables whose memory others read too (Ray object-store blocks): same values, no view.
    rows = [
        {"id": f"{i}", "custom": np.full(3, i, np.float32), "image": np.full((4, 4), i, np.uint8)}
        for i in range(6)
    ]
    write_dataset(rows, str(tmp_path / "z"))
    import pyarrow.parquet as pq

    table, _ = Decoder().decode(pq.read_table(tmp_path / "z" / "shard-00000.parquet"))
    viewed, copied = collate(table), collate(table, copy=True)
    for key in ("custom", "image"):
        torch.testing.assert_close(copied[key], viewed[key], rtol=0, atol=0)
        assert copied[key].data_ptr() != viewed[key].data_ptr()
    copied["custom"].zero_()
    assert collate(table)["custom"].sum() == 3 * sum(range(6))
