"""The demo's corpus: generated once into the cache, reused, regenerated when damaged."""

from pathlib import Path

from jin_orchestrate.config import DataConfig
from jin_orchestrate.data import default_corpus, ray_collate, ray_train_dataset
from jin_orchestrate.train import epoch_shuffle


def test_default_corpus_is_generated_once_reused_and_regenerated_when_damaged(tmp_path):
    cfg = DataConfig(samples=12, seed=3, cache_dir=str(tmp_path))
    url = Path(default_corpus(cfg, progress=False))
    assert url == tmp_path / "numberworld-v2-n12-seed3"
    assert (url / "manifest.json").is_file()
    # The synthesised speech is cached beside the corpus, one level deep.
    assert any((tmp_path / "speech").glob("*.wav"))
    assert not (tmp_path / "speech" / "speech").exists()
    shard = sorted(url.glob("*.parquet"))[0]
    before = shard.read_bytes()
    assert default_corpus(cfg, progress=False) == str(url)  # reused, not written again
    shard.write_bytes(before[: len(before) // 2])  # truncated: the checksum no longer matches
    assert default_corpus(cfg, progress=False) == str(url)
    assert shard.read_bytes() == before  # generated again, byte for byte
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_a_corpus_another_job_generated_meanwhile_is_used(tmp_path, monkeypatch):
    """Two jobs generating the same default corpus at once: the later rename failed ("Directory
    not empty") and that job stopped, though the corpus it wanted was there, complete."""
    import jin_orchestrate.data as data

    cfg = DataConfig(samples=12, seed=3, cache_dir=str(tmp_path))
    final = tmp_path / "numberworld-v2-n12-seed3"
    generate = data.generate_numberworld

    def racing(url, *args, **kwargs):  # the other job finishes while this one generates
        if not final.exists():
            generate(str(tmp_path / "other"), *args, **kwargs)
            (tmp_path / "other").rename(final)
        return generate(url, *args, **kwargs)

    monkeypatch.setattr(data, "generate_numberworld", racing)
    assert default_corpus(cfg, progress=False) == str(final)
    assert (final / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# Training data is mixed anew every epoch, and the same way when an epoch is replayed.


def _epoch_ids(dataset, data: DataConfig, epoch: int) -> list[str]:
    batches = dataset.iter_torch_batches(
        batch_size=8, collate_fn=ray_collate(data), **epoch_shuffle(data, 0, epoch, 0)
    )
    return [i for batch in batches for i in batch["id"]]


def test_every_epoch_has_its_own_order_and_a_replayed_epoch_the_same(ray_local, corpus_url):
    data = DataConfig(modalities=("text",))
    dataset = ray_train_dataset(corpus_url, data)
    first, second, again = (_epoch_ids(dataset, data, e) for e in (0, 1, 0))
    assert sorted(first) == sorted(second) and len(set(first)) == len(first) > 8
    assert first != second  # Ray repeats the seeded global shuffle on every pass
    assert again == first


def test_no_shuffle_buffer_adds_no_local_shuffle():
    assert epoch_shuffle(DataConfig(shuffle_buffer=0), 0, 3, 0) == {}
    args = [
        epoch_shuffle(DataConfig(), stage, epoch, rank)["local_shuffle_seed"]
        for stage, epoch, rank in ((0, 0, 0), (0, 1, 0), (1000, 0, 0), (0, 0, 1))
    ]
    assert len(set(args)) == 4
    assert epoch_shuffle(DataConfig(), 0, 0, 0)["local_shuffle_buffer_size"] == 256
