"""``python -m jin_orchestrate.embed``: embed a whole jin-data set into Parquet, on Ray Data.

# N rows, R retrieval width

The unit of work is one input shard. Ray Data maps :class:`ShardEmbedder` (an actor pool of
``concurrency`` actors, each holding the model once, a GPU each when the cluster has them) over
the shards not embedded yet; an actor streams its shard in batches of ``batch_size`` rows (memory
stays bounded), decodes them with jin-data's `Decoder`, embeds them with
`EmbeddingModel.embed_table` (the path serving takes) and writes the output shard under a
temporary name that is renamed when complete. So a shard's output is complete or absent, a rerun
skips every shard already done, and outputs of another model version, of another source shard
(another data set's shard of the same name) or of another selection (modalities, split,
``custom_as``) are refused, never mixed.

Output, under ``--output``: one Parquet file per input shard, of the same name (in the same
subfolder, where the data set's manifest lists shards in subfolders), with columns
``id``, ``split``, ``label`` and ``<modality>_embedding`` (``list<float32>`` of R values, null
where the sample lacks the modality), and in its metadata the model version, the checkpoint, the
source shard, the embedding width and the selection (``jin.embed.*`` keys).
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from jin_data import DataError, check_schema, list_shards
from jin_orchestrate._config import StrictConfig
from jin_orchestrate.inference import EmbeddingModel, ModelCard, card_decoder

__all__ = [
    "EmbedConfig",
    "EmbedSummary",
    "ShardEmbedder",
    "ShardResult",
    "embed_shard",
    "main",
    "run_embedding_job",
]

logger = logging.getLogger("jin_orchestrate.embed")
META_VERSION = b"jin.embed.model_version"
META_SOURCE = b"jin.embed.source"
# What decides an output's content besides the model; a rerun skips only outputs with the job's own.
META_SELECTION = {
    b"jin.embed.modalities": "--modalities",
    b"jin.embed.split": "--split",
    b"jin.embed.custom_as": "--custom-as",
}


class EmbedConfig(StrictConfig):
    """One batch-embedding job."""

    checkpoint: str = Field(description="checkpoint directory or MLflow URI")
    input: str = Field(description="fsspec URL of jin-data shards (a folder or one file)")
    output: str = Field(description="fsspec URL of the folder the embeddings go to")
    modalities: list[str] | None = Field(
        None, description="modalities to embed (default: every one the model and data share)"
    )
    split: list[str] | None = Field(None, description="only rows of these splits (default: all)")
    batch_size: int = Field(64, gt=0, description="rows per forward pass")
    concurrency: int | None = Field(
        None, gt=0, description="actors, each with the model (default: one per GPU, else per CPU)"
    )
    use_gpu: bool | None = Field(None, description="a GPU per actor (default: when present)")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="a row that does not decode or embed: fail the job, or skip it"
    )
    custom_as: str | None = Field(
        None,
        description="embed the data's custom column as this runtime-added modality (default: "
        "the one the checkpoint records for it, if any)",
    )
    mlflow_tracking_uri: str | None = None


@dataclass
class ShardResult:
    """One shard embedded: where from, where to, rows written and skipped, seconds taken; or,
    from an actor, the bad data that stopped it (``error``, the `jin_data.DataError`'s message)."""

    shard: str
    output: str
    rows: int
    skipped: int
    seconds: float
    error: str = ""


@dataclass
class EmbedSummary:
    """A finished job: shards embedded now and found complete, rows, wall time."""

    output: str
    model_version: str
    embedded: list[ShardResult]
    already_done: list[str]
    wall_s: float

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.embedded)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.embedded)


def _recorded_custom_as(cfg: EmbedConfig, card: ModelCard) -> EmbedConfig:
    """``cfg`` with ``custom_as`` defaulting to the modality the checkpoint reads from ``custom``
    (what ``jin_orchestrate.extend`` records)."""
    if cfg.custom_as is not None:
        return cfg
    recorded = next((m.name for m in card.modalities if m.column == "custom"), None)
    return cfg if recorded is None else cfg.model_copy(update={"custom_as": recorded})


def _modalities(cfg: EmbedConfig, card: ModelCard) -> list[str]:
    """Model modalities to embed, as named in the model (``custom_as`` stands for ``custom``)."""
    known = [m.name for m in card.modalities]
    data = {"text", "image", "audio", "points", "custom"}
    if cfg.custom_as is not None:
        if cfg.custom_as not in known:
            raise ValueError(
                f"custom_as: the model has no modality {cfg.custom_as!r}; it has {known}"
            )
        data = (data - {"custom"}) | {cfg.custom_as}
    chosen = cfg.modalities if cfg.modalities is not None else [m for m in known if m in data]
    chosen = list(dict.fromkeys(chosen))  # one column each: a name given twice counts once
    unknown = [m for m in chosen if m not in known or m not in data]
    if unknown:
        raise ValueError(
            f"modalities: {unknown} cannot be embedded; the model has {known}, the data columns "
            f"are {sorted(data)} (runtime modalities through custom_as)"
        )
    if not chosen:
        raise ValueError(f"modalities: nothing to embed; the model has {known}")
    return chosen


def _selection(cfg: EmbedConfig, modalities: list[str]) -> dict[bytes, bytes]:
    """The :data:`META_SELECTION` entries of a job embedding ``modalities`` (JSON values)."""
    split = None if cfg.split is None else sorted(set(cfg.split))  # a filter: order is moot
    # Only the modality that actually embeds the custom column decides the content.
    custom_as = cfg.custom_as if cfg.custom_as in modalities else None
    values = [modalities, split, custom_as]
    return {key: json.dumps(v).encode() for key, v in zip(META_SELECTION, values, strict=True)}


def _output_schema(
    cfg: EmbedConfig, modalities: list[str], card: ModelCard, source: str
) -> pa.Schema:
    fields = [
        pa.field("id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int64()),
        *(pa.field(f"{m}_embedding", pa.list_(pa.float32())) for m in modalities),
    ]
    metadata = {
        META_VERSION: card.version.encode(),
        b"jin.embed.checkpoint": card.checkpoint.encode(),
        META_SOURCE: source.encode(),
        b"jin.embed.dim": str(card.dim).encode(),
        **_selection(cfg, modalities),
    }
    return pa.schema(fields, metadata=metadata)


def _vectors_column(vectors: np.ndarray, present: np.ndarray) -> pa.Array:
    """``(N, R)`` vectors as a ``list<float32>`` column, null where not ``present``."""
    n, width = vectors.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * width)
    values = pa.array(vectors.reshape(-1), pa.float32())
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~present))


def embed_shard(model: EmbeddingModel, shard: str, cfg: EmbedConfig) -> ShardResult:
    """Embed one shard into ``cfg.output``, written under a temporary name, then renamed."""
    started = time.perf_counter()
    cfg = _recorded_custom_as(cfg, model.card)
    modalities = _modalities(cfg, model.card)
    columns = ["custom" if m == cfg.custom_as else m for m in modalities]
    decoder = card_decoder(model.card, cfg.on_error)
    splits = None if cfg.split is None else pa.array(cfg.split, pa.string())
    in_fs, in_path = fsspec.core.url_to_fs(shard)
    out_fs, out_root = fsspec.core.url_to_fs(cfg.output)
    final = posixpath.join(out_root, _output_name(cfg.input, in_path))
    _refuse_input(_url(out_fs, final), _url(in_fs, in_path), cfg)
    folder, name = posixpath.split(final)
    tmp = posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    # Recorded as jin-data lists it (a local path made absolute), which a rerun compares.
    schema = _output_schema(cfg, modalities, model.card, _url(in_fs, in_path))
    rows = skipped = 0
    out_fs.makedirs(folder, exist_ok=True)
    try:
        with in_fs.open(in_path, "rb") as f, out_fs.open(tmp, "wb") as out:
            try:
                source = pq.ParquetFile(f)
                check_schema(source.schema_arrow, shard)
            except (OSError, pa.ArrowException) as err:
                raise DataError(f"cannot read the Parquet file: {err}", url=shard) from None
            with pq.ParquetWriter(out, schema) as writer:  # closed on errors too
                for record_batch in source.iter_batches(
                    batch_size=cfg.batch_size, columns=["id", "split", "label", *columns]
                ):
                    table = pa.Table.from_batches([record_batch])
                    if splits is not None:
                        table = table.filter(pc.is_in(table["split"], splits))
                    table = table.append_column("__url", pa.array([shard] * table.num_rows))
                    decoded, errors = decoder.decode(table)
                    for error in errors:
                        logger.warning("jin embed: skipped row: %s", error)
                    skipped += table.num_rows - decoded.num_rows  # rows, not errors
                    if cfg.custom_as is not None:
                        decoded = decoded.rename_columns(
                            [cfg.custom_as if c == "custom" else c for c in decoded.column_names]
                        )
                    result = model.embed_table(decoded, modalities)
                    keep = np.ones(decoded.num_rows, bool)
                    for row, problem in sorted(result.errors.items()):
                        error = DataError(problem, url=shard, id=decoded["id"][row].as_py())
                        if cfg.on_error == "raise":
                            raise error
                        logger.warning("jin embed: skipped row: %s", error)
                        keep[row] = False
                    skipped += int((~keep).sum())
                    batch = pa.table(
                        [
                            decoded["id"],
                            decoded["split"],
                            decoded["label"],
                            *(
                                _vectors_column(result.vectors[m], result.present[m])
                                for m in modalities
                            ),
                        ],
                        schema=schema,
                    ).filter(pa.array(keep))
                    writer.write_table(batch)
                    rows += batch.num_rows
        out_fs.mv(tmp, final)
    except BaseException:
        if out_fs.exists(tmp):
            out_fs.rm(tmp)
        raise
    return ShardResult(shard, _url(out_fs, final), rows, skipped, time.perf_counter() - started)


def _output_name(input_url: str, path: str) -> str:
    """Where under ``--output`` the input shard at ``path`` goes: its path under the data set's
    root, so that shards of one name in two subfolders (``train/shard-0.parquet``,
    ``test/shard-0.parquet``) stay two files; a single file, or one outside the root, by name."""
    _, root = fsspec.core.url_to_fs(input_url)
    relative = posixpath.relpath(posixpath.normpath(path), posixpath.normpath(root))
    if relative in (".", "..") or relative.startswith("../"):
        return posixpath.basename(path)
    return relative


def _refuse_input(output: str, shard: str, cfg: EmbedConfig) -> None:
    """Refuse an output file that is the input shard itself (``--output`` naming the input)."""
    if posixpath.normpath(output) == posixpath.normpath(shard):
        raise ValueError(
            f"--output {cfg.output} would write the embeddings of {shard} over that shard itself; "
            "choose another --output"
        )


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path.lstrip('/')}"


class ShardEmbedder:
    """Ray Data ``map_batches`` actor: loads the model once, embeds one shard per row."""

    def __init__(self, cfg: EmbedConfig) -> None:
        self.cfg = cfg
        self.model = EmbeddingModel.from_checkpoint(
            cfg.checkpoint, tracking_uri=cfg.mlflow_tracking_uri
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        results = [self._embed(str(shard)) for shard in batch["shard"]]
        return {key: [getattr(r, key) for r in results] for key in ShardResult.__dataclass_fields__}

    def _embed(self, shard: str) -> ShardResult:
        try:
            return embed_shard(self.model, shard, self.cfg)
        except DataError as err:
            # Returned, not raised: Ray would wrap it in its task error, and the driver then
            # could not answer as for any other bad input (the message, exit status 2).
            return ShardResult(shard, "", 0, 0, 0.0, error=str(err))


def _check_output(
    url: str,
    metadata: dict[bytes, bytes],
    card: ModelCard,
    want: dict[bytes, bytes],
    source: str,
) -> None:
    """Refuse an existing output that is not this job's: another model version, another source
    shard (another data set's of the same name), a selection (:data:`META_SELECTION`) other than
    ``want``, or one not recorded (written before it was)."""
    remedy = "choose another --output or delete it"
    version = metadata.get(META_VERSION, b"").decode(errors="replace")
    if version != card.version:
        raise ValueError(
            f"{url} holds embeddings of model version {version or 'unknown'!r}, not "
            f"{card.version!r} ({card.checkpoint}); {remedy}"
        )
    embedded = metadata.get(META_SOURCE, b"").decode(errors="replace")
    if embedded != source:
        raise ValueError(
            f"{url} holds the embeddings of {embedded or 'an unrecorded shard'}, not of {source}; "
            f"{remedy}"
        )
    missing = [key.decode() for key in want if key not in metadata]
    if missing:
        raise ValueError(
            f"{url} does not record {missing} (written by an older jin-orchestrate), so whether it "
            f"holds this job's selection is unknown; {remedy}"
        )
    differences = [
        f"{flag} {metadata[key].decode(errors='replace')}, this job {want[key].decode()}"
        for key, flag in META_SELECTION.items()
        if metadata[key] != want[key]
    ]
    if differences:
        raise ValueError(
            f"{url} was embedded with another selection ({'; '.join(differences)}); {remedy}"
        )


def _plan(cfg: EmbedConfig, card: ModelCard, modalities: list[str]) -> tuple[list[str], list[str]]:
    """Input shards to embed, and those whose complete output of this job already exists."""
    _, shards = list_shards(cfg.input, cfg.on_error)
    out_fs, out_root = fsspec.core.url_to_fs(cfg.output)
    want = _selection(cfg, modalities)
    todo, done = [], []
    for shard in shards:
        final = posixpath.join(out_root, _output_name(cfg.input, shard.path))
        url = _url(out_fs, final)
        _refuse_input(url, shard.url, cfg)
        if not out_fs.exists(final):
            todo.append(shard.url)
            continue
        try:
            with out_fs.open(final, "rb") as f:
                metadata = pq.read_schema(f).metadata or {}
        except (OSError, pa.ArrowException) as err:
            raise ValueError(
                f"{url} is not a readable Parquet file ({err}); delete it to embed its shard again"
            ) from None
        _check_output(url, metadata, card, want, shard.url)
        done.append(shard.url)
    return todo, done


def run_embedding_job(
    cfg: EmbedConfig, *, ray_address: str | None = None, progress: bool = True
) -> EmbedSummary:
    """Embed every shard of ``cfg.input`` not yet in ``cfg.output`` on Ray Data; returns counts."""
    from jin_orchestrate.cluster import init_ray, prefer_loopback, use_gpu

    prefer_loopback(ray_address)
    import ray
    import ray.data

    from jin_orchestrate.tracking import local_checkpoint

    started = time.perf_counter()
    card = ModelCard.from_checkpoint(
        local_checkpoint(cfg.checkpoint, tracking_uri=cfg.mlflow_tracking_uri), cfg.checkpoint
    )
    cfg = _recorded_custom_as(cfg, card)
    modalities = _modalities(cfg, card)  # fails on a bad modality before any Ray start
    todo, done = _plan(cfg, card, modalities)
    say = print if progress else (lambda *a, **k: None)
    if done:
        say(f"[jin] {len(done)} of {len(todo) + len(done)} shards already embedded; skipping them")
    embedded: list[ShardResult] = []
    if todo:
        if not ray.is_initialized():
            init_ray(ray_address)
        ray.data.DataContext.get_current().enable_progress_bars = False
        gpus = 1 if use_gpu(cfg.use_gpu) else 0
        resources = ray.cluster_resources()
        pool = cfg.concurrency or max(1, int(resources.get("GPU" if gpus else "CPU", 1)))
        pool = min(pool, len(todo))
        say(
            f"[jin] embedding {len(todo)} shards of {cfg.input} with {card.checkpoint} "
            f"(version {card.version}) on {pool} actor(s){' with a GPU each' if gpus else ''}",
            flush=True,
        )
        shards = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        results = shards.map_batches(
            ShardEmbedder,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=1,
            concurrency=pool,
            num_cpus=1,
            num_gpus=gpus,
        )
        for row in results.iter_rows():
            result = ShardResult(**{k: row[k] for k in ShardResult.__dataclass_fields__})
            if result.error:
                raise DataError(result.error)
            embedded.append(result)
            say(
                f"[jin] {len(embedded)}/{len(todo)} {posixpath.basename(result.output)}: "
                f"{result.rows} rows ({result.skipped} skipped) in {result.seconds:.1f} s",
                flush=True,
            )
    return EmbedSummary(cfg.output, card.version, embedded, done, time.perf_counter() - started)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jin_orchestrate.embed",
        description="Embed jin-data shards into Parquet (one output shard per input shard) on "
        "Ray Data; a rerun skips shards already embedded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or MLflow URI")
    p.add_argument("--input", required=True, help="fsspec URL of jin-data shards")
    p.add_argument("--output", required=True, help="fsspec URL of the output folder")
    p.add_argument("--modalities", help="comma-separated (default: all the model and data share)")
    p.add_argument("--split", help="comma-separated splits to embed (default: every row)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    p.add_argument("--concurrency", type=int, help="actors (default: one per GPU, else per CPU)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.add_argument("--custom-as", help="embed the custom column as this runtime modality")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the job, print its summary."""
    from jin_orchestrate.tracking import MLFLOW_SCHEMES, default_tracking_uri

    args = _parser().parse_args(argv)
    split = args.split.split(",") if args.split else None
    try:
        cfg = EmbedConfig(
            checkpoint=args.checkpoint,
            input=args.input,
            output=args.output,
            modalities=args.modalities.split(",") if args.modalities else None,
            split=split,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            on_error=args.on_error,
            custom_as=args.custom_as,
            # Actors run in other directories: resolve a local MLflow store here.
            mlflow_tracking_uri=default_tracking_uri()
            if args.checkpoint.startswith(MLFLOW_SCHEMES)
            else None,
        )
        summary = run_embedding_job(cfg, ray_address=args.ray_address)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[jin] done: {len(summary.embedded)} shards embedded ({summary.rows} rows, "
        f"{summary.skipped} skipped), {len(summary.already_done)} already complete; "
        f"model version {summary.model_version}; {summary.output}; {summary.wall_s:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
