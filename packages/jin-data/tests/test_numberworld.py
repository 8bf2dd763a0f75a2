"""NumberWorld: byte-identical for a seed, held-out numbers kept out of train, every modality."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from jin_data import ShardDataset, verify_dataset, write_dataset
from jin_data.numberworld import (
    EspeakNotFoundError,
    NumberWorldConfig,
    SpeechCache,
    generate_numberworld,
    number_words,
)
from jin_data.numberworld.__main__ import main

# CI installs espeak-ng (scripts/setup.sh), so there a missing espeak-ng fails instead of skipping.
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None and not os.environ.get("CI"),
    reason="espeak-ng is not installed (apt-get install espeak-ng)",
)
SMALL = {"voices": 2, "rows_per_shard": 16, "row_group_size": 8, "progress": False}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("speech"))


def _digests(url: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(url).iterdir())}


@needs_espeak
def test_same_seed_gives_byte_identical_shards(tmp_path, cache):
    first, second, other = (str(tmp_path / name) for name in ("a", "b", "c"))
    generate_numberworld(first, 40, seed=7, cache_dir=cache, **SMALL)
    generate_numberworld(second, 40, seed=7, cache_dir=cache, **SMALL)
    generate_numberworld(other, 40, seed=8, cache_dir=cache, **SMALL)
    assert _digests(first) == _digests(second)
    assert len(_digests(first)) == 4  # 3 shards + manifest
    assert _digests(first)["shard-00000.parquet"] != _digests(other)["shard-00000.parquet"]


@needs_espeak
def test_held_out_numbers_never_in_train_and_every_modality_present(tmp_path, cache):
    url = str(tmp_path / "nw")
    manifest = generate_numberworld(url, 80, seed=1, cache_dir=cache, held_out=[1, 2, 3], **SMALL)
    verify_dataset(url)
    assert manifest.num_rows == 80 and set(manifest.splits) <= {"train", "val", "test"}
    batch = next(iter(ShardDataset(url, batch_size=80, shuffle=False)))
    labels = batch["label"].numpy()
    train = np.array([s == "train" for s in batch["split"]])
    assert not np.isin(labels[train], [1, 2, 3]).any()
    assert train.sum() > 40
    for modality in ("text", "image", "audio", "points", "custom"):
        assert batch[f"{modality}_present"].all(), modality
    assert batch["image"].shape == (80, 1, 64, 64)
    assert batch["points"].shape == (80, 256, 3) and not batch["points_padding_mask"].any()
    assert batch["custom"].shape == (80, 14)
    lengths = batch["audio_lengths"]
    assert (lengths > 4000).all() and (lengths < 48000).all()  # 0.25 s .. 3 s of speech at 16 kHz
    for text, label in zip(batch["text"], labels, strict=True):
        assert str(label) in text or number_words(int(label)) in text
    # The seven-segment vector is the number, noisily: nearest clean code decodes the units digit.
    from jin_data.numberworld.render import SEVEN_SEGMENTS

    units = batch["custom"][:, 7:].numpy()
    decoded = np.argmin(((units[:, None, :] - SEVEN_SEGMENTS[None]) ** 2).sum(-1), axis=1)
    assert (decoded == labels % 10).mean() > 0.8


def test_missing_espeak_names_the_install_line(tmp_path):
    speech = SpeechCache(tmp_path, executable="espeak-ng-not-installed")
    from jin_data.numberworld.speech import DEFAULT_VOICES

    with pytest.raises(EspeakNotFoundError, match=r"apt-get install espeak-ng"):
        speech.ensure({("one", DEFAULT_VOICES[0])})


def test_config_checks_name_the_key():
    with pytest.raises(ValueError, match=r"held_out: expected distinct numbers in 0\.\.99"):
        NumberWorldConfig(samples=1, held_out=[100])
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction"):
        NumberWorldConfig(samples=1, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="glyph_height"):
        NumberWorldConfig(samples=1, canvas=32, glyph_height=(16, 28))


def test_number_words():
    assert [number_words(n) for n in (0, 13, 40, 42, 99)] == [
        "zero", "thirteen", "forty", "forty-two", "ninety-nine",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"expected 0\.\.99, received 100"):
        number_words(100)


@needs_espeak
def test_command_line(tmp_path, cache, capsys):
    url = str(tmp_path / "cli")
    code = main(["--out", url, "--samples", "12", "--seed", "3", "--cache-dir", cache])
    assert code == 0 and "wrote 12 samples" in capsys.readouterr().out
    verify_dataset(url)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--samples", "0"],
            "argument --samples: input should be greater than or equal to 1, received 0",
        ),
        (["--seed", "-1"], "argument --seed: input should be greater than or equal to 0"),
        (["--rows-per-shard", "0"], "argument --rows-per-shard: input should be greater than"),
        (["--held-out", "7,7"], "argument --held-out: held_out: expected distinct numbers"),
        (["--held-out", "100"], "argument --held-out: held_out: expected distinct numbers"),
        (["--out", ""], "argument --out: expected the URL of a data set, received ''"),
        (["--out", "nope://x"], "argument --out: Protocol not known: nope"),
    ],
)
def test_command_line_bad_values_are_usage_errors_naming_the_flag(
    tmp_path, monkeypatch, capsys, flags, message
):
    monkeypatch.chdir(tmp_path)  # where --out "" used to write
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "x"), "--samples", "2", "--no-progress", *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_command_line_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "x"), "--held-out", "7,x"])
    assert exit_.value.code == 2
    assert "argument --held-out: expected comma-separated integers, received '7,x'" in (
        capsys.readouterr().err
    )
    url = str(tmp_path / "there")
    write_dataset([{"id": "a"}], url)
    assert main(["--out", url, "--samples", "1", "--no-progress"]) == 2
    assert "already exists" in (err := capsys.readouterr().err) and "pass --overwrite" in err
