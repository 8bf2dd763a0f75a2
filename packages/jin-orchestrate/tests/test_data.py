"""The demo's corpus: generated once into the cache, reused, regenerated when damaged."""

from pathlib import Path

from jin_orchestrate.config import DataConfig
from jin_orchestrate.data import default_corpus


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
