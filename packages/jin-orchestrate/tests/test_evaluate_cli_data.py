"""``python -m jin_orchestrate.evaluate`` (and `evaluate_checkpoint` by default) evaluates with
the data config stored in the checkpoint, as pretraining's own evaluation does: runtime-added
modalities get their rows, and its ``data.on_error`` decides what a bad row does."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from jin_data import list_shards
from jin_orchestrate.checkpoint import read_config, save_checkpoint
from jin_orchestrate.evaluate import evaluate_checkpoint, load_model, main


def test_the_cli_uses_the_checkpoints_columns_and_on_error(checkpoint, corpus_url, tmp_path):
    # The fixture's checkpoint as `extend` records it: seven_segment read from the custom column;
    # bad rows skipped.
    config = read_config(checkpoint)
    data = config["data"]
    data.update(
        modalities=[*data["modalities"], "seven_segment"],
        columns={"seven_segment": "custom"},
        on_error="skip",
    )
    extended = save_checkpoint(
        tmp_path / "extended", load_model(checkpoint), config=config, state={"global_step": 0}
    )
    # The corpus with one test image that does not decode.
    fs, [shard] = list_shards(corpus_url)
    with fs.open(shard.path, "rb") as f:
        table = pq.read_table(f)
    splits = table["split"].to_pylist()
    images = table["image"].to_pylist()
    images[splits.index("test")] = b"not an image"
    damaged = tmp_path / "corpus" / "shard-00000.parquet"
    damaged.parent.mkdir()
    column = table.schema.get_field_index("image")
    pq.write_table(table.set_column(column, "image", pa.array(images, pa.binary())), damaged)

    out = tmp_path / "eval.json"
    argv = ["--checkpoint", str(extended), "--data", str(damaged.parent), "--json", str(out)]
    assert main(argv) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["test_samples"] == splits.count("test") - 1
    for direction in ("seven_segment_to_text", "text_to_seven_segment"):
        assert 0.0 <= metrics[f"retrieval/{direction}/R10"] <= 1.0
    assert "zero_shot_seven_segment_top1_all_test" in metrics
    # The library call defaults to the same stored config.
    library = evaluate_checkpoint(extended, str(damaged.parent))
    assert library["test_samples"] == metrics["test_samples"]
    assert "retrieval/seven_segment_to_text/R10" in library
