"""Bad data through the whole pretraining path, and the decoders fuzzed.

A copy of the NumberWorld corpus is rewritten into four shards and damaged: one shard truncated,
one replaced by another data set's Parquet file, and in the others three train rows with an image
that does not decode, three with audio that does not decode and three with NaN audio samples.
With ``data.on_error=skip`` a real job trains on the rest and counts each kind in its log and in
MLflow; with ``raise`` each fault stops the data path with an error naming where it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultjobs import ONE_STAGE, start_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jin_data import DecodeError, Decoder, write_dataset
from jin_data.decode import AudioView, decode_audio, decode_image
from jin_data.schema import AUDIO_TYPE

pytestmark = pytest.mark.fault

ROWS_PER_SHARD = 50
BAD_IMAGE, BAD_AUDIO, NAN_AUDIO = 3, 3, 3


def _samples(url: str) -> list[dict]:
    table = pq.read_table(next(Path(url).glob("*.parquet")))
    samples = []
    for row in table.to_pylist():
        sample = {k: row[k] for k in ("id", "split", "label", "text", "image")}
        sample["audio"] = row["audio"]["bytes"]
        sample["points"] = np.asarray(row["points"], np.float32)
        if row["custom"] is not None:
            sample["custom"] = np.asarray(row["custom"], np.float32)
        samples.append(sample)
    return samples


def damaged_corpus(url: str, root: Path) -> tuple[str, dict[str, int]]:
    """The damaged copy described above, and the rows each error type must leave out."""
    samples = _samples(url)
    # The damaged rows: train rows of shards 0 and 3 (shards 1 and 2 are lost whole).
    train = [
        i for i, s in enumerate(samples) if s["split"] == "train" and i // ROWS_PER_SHARD in (0, 3)
    ]
    bad = iter(train[: BAD_IMAGE + BAD_AUDIO + NAN_AUDIO])
    for _ in range(BAD_IMAGE):
        samples[next(bad)]["image"] = b"\x89PNG\r\n\x1a\n not really a png"
    for _ in range(BAD_AUDIO):
        samples[next(bad)]["audio"] = b"RIFF\x00\x00\x00\x00WAVEjunk"
    for _ in range(NAN_AUDIO):
        sample = samples[next(bad)]
        sample["audio"] = np.full(1600, np.nan, np.float32)
        sample["audio_sample_rate"] = 16000
    out = root / "damaged"
    write_dataset(samples, str(out), rows_per_shard=ROWS_PER_SHARD, row_group_size=25)
    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == 4
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    pq.write_table(pa.table({"x": [1, 2, 3]}), shards[2])  # another data set's file
    expected = {
        "ShardError": ROWS_PER_SHARD,
        "SchemaError": ROWS_PER_SHARD,
        "DecodeError": BAD_IMAGE + BAD_AUDIO + NAN_AUDIO,
    }
    return str(out), expected


@pytest.fixture(scope="module")
def damaged(numberworld_url, tmp_path_factory) -> tuple[str, dict[str, int]]:
    return damaged_corpus(numberworld_url, tmp_path_factory.mktemp("damaged"))


def test_skip_trains_on_the_rest_and_counts_every_fault(damaged, tmp_path):
    url, expected = damaged
    config = {**ONE_STAGE, "data": {"on_error": "skip"}}
    job = start_job(tmp_path, url, config=config)
    code, output = job.wait()
    assert code == 0, output[-4000:]
    assert "within_modality step 6/6" in output
    total = sum(expected.values())
    shown = ", ".join(f"{kind} {n}" for kind, n in sorted(expected.items()))
    assert f"[jin] data: {total} rows skipped so far in this job ({shown})" in output, output[
        -4000:
    ]
    # Where: the first error of each kind, with its place, in the log and in MLflow.
    assert "[jin] data: first ShardError: url=" in output
    assert "[jin] data: first SchemaError: url=" in output
    assert "[jin] data: first DecodeError: url=" in output
    client, run = job.stage_run()
    record = json.loads(
        Path(client.download_artifacts(run.info.run_id, "data_errors.json")).read_text()
    )
    assert record["skipped_rows"] == expected
    assert run.data.metrics["data/skipped_rows"] == total
    for kind, rows in expected.items():
        assert run.data.metrics[f"data/skipped_rows/{kind}"] == rows


@pytest.fixture(scope="module")
def ray_here():
    import ray

    from jin_orchestrate.cluster import init_ray

    init_ray(None)  # a private Ray on loopback, never one already running on the machine
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _one_fault(url: str, root: Path, kind: str) -> str:
    """A one-shard copy of ``url``'s corpus (40 rows) with one fault of ``kind``."""
    samples = _samples(url)[:40]
    first_train = next(i for i, s in enumerate(samples) if s["split"] == "train")
    if kind == "image":
        samples[first_train]["image"] = b"GIF89a broken"
    elif kind == "audio":
        samples[first_train]["audio"] = b"fLaC broken"
    elif kind == "nan_audio":
        samples[first_train]["audio"] = np.array([0.1, np.nan, 0.2], np.float32)
        samples[first_train]["audio_sample_rate"] = 16000
    out = root / kind
    write_dataset(samples, str(out))
    shard = next(out.glob("*.parquet"))
    if kind == "truncated":
        shard.write_bytes(shard.read_bytes()[:-5000])
    elif kind == "foreign":
        pq.write_table(pa.table({"x": [1]}), shard)
    return str(out)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", r"url='[^']*shard-00000\.parquet'.*Parquet"),
        ("foreign", r"url='[^']*shard-00000\.parquet'"),
        ("image", r"column='image' id='[^']+'.*does not decode"),
        ("audio", r"column='audio' id='[^']+'.*does not decode"),
        ("nan_audio", r"column='audio' id='[^']+'.*non-finite values"),
    ],
)
def test_raise_stops_at_the_first_fault_naming_it(
    ray_here, numberworld_url, tmp_path, kind, message
):
    from jin_orchestrate.config import load_config
    from jin_orchestrate.data import ray_collate, ray_train_dataset

    url = _one_fault(numberworld_url, tmp_path, kind)
    cfg = load_config("jin-test").data
    assert cfg.on_error == "raise"

    def read_all() -> None:
        dataset = ray_train_dataset(url, cfg)
        for _ in dataset.iter_torch_batches(batch_size=8, collate_fn=ray_collate(cfg)):
            pass

    # From a Ray Data task the DataError comes wrapped in Ray's RayTaskError, message and all.
    with pytest.raises(Exception, match=message):
        read_all()


def _decodes_or_names_the_row(table: pa.Table, column: str) -> None:
    """``skip`` keeps the row or returns its located error; ``raise`` raises that error."""
    decoded, errors = Decoder(on_error="skip").decode(table)
    assert decoded.num_rows + len(errors) == 1
    if errors:
        assert (errors[0].column, errors[0].id) == (column, "x")
        with pytest.raises(DecodeError, match=f"column='{column}' id='x'"):
            Decoder(on_error="raise").decode(table)
    else:
        assert Decoder(on_error="raise").decode(table)[0].num_rows == 1


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=512))
def test_image_decoder_fuzzed_fails_only_as_a_located_decode_error(data):
    table = pa.table({"id": ["x"], "image": pa.array([data], pa.binary())})
    _decodes_or_names_the_row(table, "image")


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=256).map(lambda b: b"RIFF\x24\x00\x00\x00WAVEfmt " + b),
    ),
    rate=st.integers(-5, 200_000),
)
def test_audio_decoder_fuzzed_fails_only_as_a_located_decode_error(data, rate):
    audio = pa.array([{"bytes": data, "samples": None, "sample_rate": None}], AUDIO_TYPE)
    _decodes_or_names_the_row(pa.table({"id": ["x"], "audio": audio}), "audio")
    # Raw samples at any rate: decoded, or a ValueError naming the rate where it is not > 0.
    view = AudioView(None, np.zeros(8, np.float32), rate)
    if rate > 0:
        assert decode_audio(view, 16000).dtype == np.float32
    else:
        with pytest.raises(ValueError, match="sample_rate > 0"):
            decode_audio(view, 16000)


@FUZZ
@given(
    values=st.lists(
        st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=6),
        min_size=1,
        max_size=8,
    )
)
def test_finite_check_fuzzed_drops_exactly_the_non_finite_rows(values):
    from jin_orchestrate.data_faults import FiniteCheck

    ids = [f"s{i}" for i in range(len(values))]
    table = pa.table({"id": ids, "audio_wave": pa.array(values, pa.list_(pa.float32()))})
    finite = [bool(np.isfinite(np.asarray(v, np.float32)).all()) for v in values]
    kept = FiniteCheck("skip")(table)
    assert kept["id"].to_pylist() == [i for i, ok in zip(ids, finite, strict=True) if ok]
    if all(finite):
        assert FiniteCheck("raise")(table).num_rows == len(values)
    else:
        with pytest.raises(DecodeError, match="column='audio'"):
            FiniteCheck("raise")(table)


def test_decode_image_of_the_corpus_still_works(numberworld_url):
    """The fuzzed decoders still decode real data (the fuzz tests above would pass on a stub)."""
    row = pq.read_table(next(Path(numberworld_url).glob("*.parquet"))).slice(0, 1).to_pylist()[0]
    assert decode_image(row["image"], None).shape[0] == 1
    wav = AudioView(np.frombuffer(row["audio"]["bytes"], np.uint8), None, None)
    assert decode_audio(wav, 16000).size
