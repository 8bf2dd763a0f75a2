"""A rerun of the embed job skips only outputs of its own selection; others, outputs that do not
record it, and damaged ones are refused, naming the file and the remedy. None of these start Ray:
the plan is made before."""

import shutil
from collections import Counter

import pyarrow.parquet as pq
import pytest

from jin_data import list_shards
from jin_data.manifest import load_manifest, sha256_file
from jin_orchestrate.embed import EmbedConfig, _plan, embed_shard, main, run_embedding_job
from jin_orchestrate.inference import EmbeddingModel

NAMES = ["shard-00000.parquet", "shard-00001.parquet"]


@pytest.fixture(scope="module")
def first_job(corpus_url, checkpoint, tmp_path_factory):
    """Two 6-row input shards and their outputs of a job embedding text of the test split only."""
    fs, [shard] = list_shards(corpus_url)
    with fs.open(shard.path, "rb") as f:
        table = pq.read_table(f)
    inputs = tmp_path_factory.mktemp("inputs")
    for i, name in enumerate(NAMES):
        pq.write_table(table.slice(6 * i, 6), inputs / name)
    outputs = tmp_path_factory.mktemp("outputs")
    cfg = EmbedConfig(
        checkpoint=str(checkpoint),
        input=str(inputs),
        output=str(outputs),
        modalities=["text"],
        split=["test"],
    )
    model = EmbeddingModel.from_checkpoint(checkpoint, device="cpu")
    for name in NAMES:
        embed_shard(model, str(inputs / name), cfg)
    return cfg, outputs


@pytest.fixture
def rerun(first_job, tmp_path):
    """The first job's config and a copy of its outputs to damage."""
    cfg, outputs = first_job
    out = tmp_path / "out"
    shutil.copytree(outputs, out)
    return cfg.model_copy(update={"output": str(out)}), out


def _rewrite_metadata(path, change):
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    change(metadata)
    pq.write_table(table.replace_schema_metadata(metadata), path)


@pytest.mark.parametrize(
    ("update", "difference"),
    [
        ({"modalities": None}, r'--modalities \["text"\], this job \["text", "image", '),
        ({"split": None}, r'--split \["test"\], this job null'),
    ],
    ids=["modalities", "split"],
)
def test_a_rerun_skips_its_own_outputs_and_refuses_another_selections(rerun, update, difference):
    cfg, _ = rerun
    # The same selection, the split spelt otherwise, a runtime modality named that is not
    # embedded: complete, nothing to do.
    same = cfg.model_copy(update={"split": ["test", "test"], "custom_as": "seven_segment"})
    again = run_embedding_job(same, progress=False)
    assert (again.embedded, len(again.already_done)) == ([], 2)
    with pytest.raises(
        ValueError,
        match=rf"shard-00000\.parquet was embedded with another selection \({difference}.*\); "
        "choose another --output or delete it",
    ):
        run_embedding_job(cfg.model_copy(update=update), progress=False)


def test_an_output_of_another_data_sets_shard_of_the_same_name_is_refused(
    rerun, corpus_url, tmp_path
):
    """jin-data names every data set's shards alike: the name alone does not make it this job's."""
    cfg, _ = rerun
    fs, [shard] = list_shards(corpus_url)
    with fs.open(shard.path, "rb") as f:
        table = pq.read_table(f)
    other = tmp_path / "other"
    other.mkdir()
    for i, name in enumerate(NAMES):
        pq.write_table(table.slice(12 + 6 * i, 6), other / name)
    with pytest.raises(
        ValueError,
        match=rf"shard-00000\.parquet holds the embeddings of {cfg.input}/shard-00000\.parquet, "
        rf"not of {other}/shard-00000\.parquet; choose another --output or delete it",
    ):
        run_embedding_job(cfg.model_copy(update={"input": str(other)}), progress=False)


def test_a_shard_embedded_by_a_relative_path_is_its_own_on_a_rerun(
    first_job, checkpoint, tmp_path, monkeypatch
):
    """The source is recorded as jin-data lists it (absolute), which the rerun compares."""
    cfg, _ = first_job
    parent, folder = cfg.input.rsplit("/", 1)
    monkeypatch.chdir(parent)
    relative = cfg.model_copy(update={"input": f"{folder}/{NAMES[0]}", "output": str(tmp_path)})
    model = EmbeddingModel.from_checkpoint(checkpoint, device="cpu")
    result = embed_shard(model, relative.input, relative)
    source = pq.read_schema(result.output).metadata[b"jin.embed.source"].decode()
    assert source == f"{cfg.input}/{NAMES[0]}"
    again = run_embedding_job(relative, progress=False)
    assert (again.embedded, len(again.already_done)) == ([], 1)


def test_an_output_of_another_custom_as_is_refused(rerun):
    cfg, out = rerun
    _rewrite_metadata(
        out / NAMES[1], lambda m: m.update({b"jin.embed.custom_as": b'"other_modality"'})
    )
    with pytest.raises(
        ValueError,
        match=r"shard-00001\.parquet was embedded with another selection \(--custom-as "
        r'"other_modality", this job null\); choose another --output or delete it',
    ):
        run_embedding_job(cfg, progress=False)


def test_an_output_that_does_not_record_its_selection_is_refused(rerun):
    cfg, out = rerun

    def forget_selection(metadata):  # as written before the split and custom_as were recorded
        metadata.pop(b"jin.embed.split", None)
        metadata.pop(b"jin.embed.custom_as", None)

    for name in NAMES:
        _rewrite_metadata(out / name, forget_selection)
    with pytest.raises(
        ValueError,
        match=r"shard-00000\.parquet does not record \['jin\.embed\.split', "
        r"'jin\.embed\.custom_as'\] .*; choose another --output or delete it",
    ):
        run_embedding_job(cfg, progress=False)


def test_a_damaged_output_is_named_with_the_remedy(rerun, capsys):
    cfg, out = rerun
    damaged = out / NAMES[1]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a copy cut short
    argv = ["--checkpoint", cfg.checkpoint, "--input", cfg.input, "--output", cfg.output,
            "--modalities", "text", "--split", "test"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {damaged} is not a readable Parquet file (" in err
    assert err.rstrip().endswith("; delete it to embed its shard again")


def test_shards_of_one_name_in_two_subfolders_are_embedded_to_two_files(
    corpus_url, checkpoint, tmp_path
):
    """A manifest may list shards in subfolders: ``a/shard-00000`` and ``b/shard-00000`` both went
    to ``<output>/shard-00000.parquet``, the second over the first, and both counted as done."""
    fs, [shard] = list_shards(corpus_url)
    with fs.open(shard.path, "rb") as f:
        table = pq.read_table(f)
    manifest = load_manifest(fs, corpus_url)
    root, parts, infos = tmp_path / "nested", {}, []
    for i, folder in enumerate("ab"):
        path = root / folder / NAMES[0]
        path.parent.mkdir(parents=True)
        parts[folder] = table.slice(6 * i, 6)
        pq.write_table(parts[folder], path)
        info = {
            "path": f"{folder}/{NAMES[0]}",
            "num_rows": 6,
            "row_groups": [6],
            "splits": dict(Counter(parts[folder]["split"].to_pylist())),
            "num_bytes": path.stat().st_size,
            "sha256": sha256_file(fs, str(path)),
        }
        infos.append(manifest.shards[0].model_copy(update=info))
    nested = manifest.model_copy(update={"shards": infos, "num_rows": 12})
    (root / "manifest.json").write_text(nested.to_json())
    out = tmp_path / "out"
    cfg = EmbedConfig(
        checkpoint=str(checkpoint), input=str(root), output=str(out), modalities=["text"]
    )
    model = EmbeddingModel.from_checkpoint(checkpoint, device="cpu")
    todo, done = _plan(cfg, model.card, ["text"])
    assert (len(todo), done) == (2, [])
    for url in todo:  # what the job's actors do, one shard each
        embed_shard(model, url, cfg)
    for folder, part in parts.items():
        assert pq.read_table(out / folder / NAMES[0])["id"].to_pylist() == part["id"].to_pylist()
    again = run_embedding_job(cfg, progress=False)
    assert (again.embedded, len(again.already_done)) == ([], 2)


def test_an_output_folder_that_is_the_input_is_refused(first_job, checkpoint, tmp_path):
    """The input shard was read as a foreign output, with the remedy to delete it (the user's
    data); `embed_shard`, as an actor runs it, wrote the embeddings over it."""
    cfg, _ = first_job
    inputs = tmp_path / "inputs"
    shutil.copytree(cfg.input, inputs)
    same = cfg.model_copy(update={"input": str(inputs), "output": str(inputs)})
    refused = rf"--output {inputs} would write the embeddings of {inputs}/shard-00000\.parquet "
    with pytest.raises(ValueError, match=refused + "over that shard itself; choose another"):
        run_embedding_job(same, progress=False)
    model = EmbeddingModel.from_checkpoint(checkpoint, device="cpu")
    with pytest.raises(ValueError, match=refused):
        embed_shard(model, str(inputs / NAMES[0]), same)
    assert "text_embedding" not in pq.read_schema(inputs / NAMES[0]).names
