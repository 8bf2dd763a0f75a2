"""``python -m jin_orchestrate.pretrain``: curriculum pretraining on Ray Train, tracked in MLflow.

The same command runs on a laptop (it starts a local Ray and a local MLflow store) and on a cluster
(``ray job submit -- python -m jin_orchestrate.pretrain ...`` connects to the cluster's Ray; set
``MLFLOW_TRACKING_URI`` to a tracking server there). With no ``--data`` it generates a small
NumberWorld corpus once, into a cache, and trains on it.

Stages (paper §4.2) run one after another as separate ``TorchTrainer.fit`` calls, each starting from
the previous stage's final checkpoint; MLflow gets one parent run for the job and a nested run per
stage. ``--resume`` continues an interrupted job in the same ``--output`` directory under the config
its ``job.json`` holds: finished stages are skipped and the unfinished one restarts from its latest
complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jin_orchestrate.overrides import add_override_argument

__all__ = [
    "PretrainResult",
    "add_job_arguments",
    "check_resumed_config",
    "checkpoint_source",
    "main",
    "output_dir",
    "run_job_from_checkpoint",
    "run_pretraining",
]

RUNS_ROOT = Path("jin_runs")
JOB_FILE = "job.json"
# What a resumed job may change in its config: where it runs, not what it trains.
RESUMABLE_KEYS = ("train.num_workers",)


@dataclass
class PretrainResult:
    """What a finished job produced."""

    output: Path
    checkpoint: Path
    parent_run_id: str
    stage_run_ids: list[str]
    evaluation: dict[str, float]
    wall_s: float


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jin_orchestrate.pretrain",
        description="Curriculum pretraining of Jin on Ray Train with MLflow tracking.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--preset",
        help="size preset (see `python -m jin_orchestrate.config list`); default: jin-tiny, or "
        "with --resume the job's own config",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="YAML or JSON file merged over the preset (with --resume: over the job's config)",
    )
    p.add_argument(
        "--data",
        help="fsspec URL of jin-data shards; default: generate NumberWorld once into the cache",
    )
    add_job_arguments(p, experiment="jin-pretrain")
    return p


def add_job_arguments(p: argparse.ArgumentParser, *, experiment: str) -> None:
    """The flags every Ray Train job of this package takes (pretraining, extension)."""
    add_override_argument(
        p, "override one config key, e.g. --set train.lr=3e-4 (repeatable; applied last)"
    )
    p.add_argument(
        "--num-workers",
        type=int,
        help="Ray Train workers (default: train.num_workers of the config)",
    )
    p.add_argument(
        "--output", type=Path, help="job directory (default: a new jin_runs/<timestamp>)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the job in --output (default: the newest job under jin_runs/) from its "
        "latest checkpoint, under the config it started with; flags that would change that "
        "config are refused (the worker count may change)",
    )
    p.add_argument("--experiment", default=experiment, help="MLflow experiment name")
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join, e.g. 'auto' on a head node (default: $RAY_ADDRESS, which "
        "`ray job submit` sets; else a new local Ray)",
    )


def output_dir(args: argparse.Namespace) -> Path:
    """The job directory of ``--output``/``--resume`` (a new one under jin_runs/ by default)."""
    if args.output is not None:
        out = args.output
    elif args.resume:
        jobs = sorted(p for p in RUNS_ROOT.glob("*") if (p / JOB_FILE).is_file())
        if not jobs:
            raise SystemExit(f"--resume: no job found under {RUNS_ROOT}/; pass --output DIR")
        out = jobs[-1]
    else:
        out = RUNS_ROOT / time.strftime("%Y%m%d-%H%M%S")
    if args.resume and not (out / JOB_FILE).is_file():
        raise SystemExit(f"--resume: {out} holds no job ({out / JOB_FILE} is missing)")
    if not args.resume and (out / JOB_FILE).exists():
        raise SystemExit(
            f"{out} already holds a job; pass --resume to continue it or another --output"
        )
    return out.resolve()


def check_resumed_config(job_file: Path, cfg: Any) -> None:
    """Refuse, naming the keys, to resume the job of ``job_file`` under a config other than the
    one it started with (``train.num_workers`` aside): its checkpoints and finished stages belong
    to that config."""
    from jin_orchestrate.config import JinConfig, config_changes

    # The worker count may change; a job started before batches had to split over it evenly
    # validates again under the count it resumes with.
    started = _started_config(job_file)
    started = {
        **started,
        "train": {**started.get("train", {}), "num_workers": cfg.train.num_workers},
    }
    started = JinConfig.model_validate(started).model_dump(mode="json")
    changes = {
        key: values
        for key, values in config_changes(started, cfg.model_dump(mode="json")).items()
        if key not in RESUMABLE_KEYS
    }
    if changes:
        shown = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
        more = f"; and {len(shown) - 10} more" if len(shown) > 10 else ""
        raise ValueError(
            f"--resume: the job in {job_file.parent} started with another config; "
            f"{len(changes)} key(s) differ from its {JOB_FILE} ({'; '.join(shown[:10])}{more}). "
            "A resumed job keeps its config: pass the flags it started with (pretrain: --resume "
            "alone takes the job's config) or start a new job with another --output"
        )


def _started_config(job_file: Path) -> dict[str, Any]:
    """The config a job started with, as its ``job.json`` records it."""
    job = json.loads(job_file.read_text())
    if "config" not in job:
        raise ValueError(f"{job_file} records no config; the job cannot be resumed")
    return job["config"]


def run_pretraining(
    cfg: Any,
    *,
    output: Path,
    data_url: str | None = None,
    resume: bool = False,
    experiment: str = "jin-pretrain",
    ray_address: str | None = None,
    progress: bool = True,
    init_checkpoint: str | Path | None = None,
) -> PretrainResult:
    """Run every curriculum stage on Ray Train and evaluate the result; returns what it made.

    ``init_checkpoint`` is what the first stage starts from (default: a fresh model); it may lack
    the config's runtime-added modalities, as when `jin_orchestrate.extend` adds one.

    Data skipped under ``data.on_error="skip"`` is counted by a tally actor; the Ray data tasks
    report to it through a ``worker_process_setup_hook`` that this function sets when it connects
    to Ray. Where the caller connected to Ray already, skips are logged but not counted.

    With ``resume``, ``cfg`` must be the config the job in ``output`` started with (its
    ``job.json``; only ``train.num_workers`` may differ), else a ``ValueError`` names the keys
    before Ray or MLflow start.
    """
    stage_dirs = _stage_dirs(cfg)
    if resume:
        check_resumed_config(output / JOB_FILE, cfg)
    import mlflow

    from jin_orchestrate.cluster import prefer_loopback

    prefer_loopback(ray_address)
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jin_orchestrate.checkpoint import latest_checkpoint
    from jin_orchestrate.cluster import init_ray, use_gpu
    from jin_orchestrate.data import default_corpus, ray_train_dataset
    from jin_orchestrate.data_faults import (
        DataErrorTally,
        install_tally_handler,
        tally_runtime_env,
    )
    from jin_orchestrate.evaluate import evaluate_checkpoint, format_summary
    from jin_orchestrate.tracking import flatten_params, resolve_tracking
    from jin_orchestrate.train import STOPPED, stopped_error, train_stage_worker

    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    job_file = output / JOB_FILE
    job: dict[str, Any] = json.loads(job_file.read_text()) if resume else {}
    url = (
        data_url
        or job.get("data_url")
        or cfg.data.url
        or default_corpus(cfg.data, progress=progress)
    )
    tracking = resolve_tracking(experiment)
    client = tracking.client()

    tally_name = f"jin-data-tally-{uuid.uuid4().hex[:12]}"
    if not ray.is_initialized():
        # Two logical CPUs beyond the cores: training workers take one CPU each, and on a laptop
        # they would otherwise leave none for Ray Data's read/decode tasks, which then never run.
        init_ray(ray_address, extra_cpus=2, runtime_env=tally_runtime_env(tally_name))
    ray.data.DataContext.get_current().enable_progress_bars = False
    tally = ray.remote(num_cpus=0)(DataErrorTally).options(name=tally_name).remote()
    install_tally_handler(tally_name)  # this process's own skips: unreadable shards
    dataset = ray_train_dataset(
        url, cfg.data, split="train", audio_sample_rate=cfg.model.audio_sample_rate
    )

    if "parent_run_id" in job:
        parent_id = job["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
    else:
        parent = client.create_run(
            tracking.experiment_id,
            run_name=f"{cfg.preset}-{output.name}",
            tags={"jin.output": str(output)},
        )
        parent_id = parent.info.run_id
        for key, value in flatten_params(cfg.model_dump(mode="json")).items():
            client.log_param(parent_id, key, value)
        client.log_param(parent_id, "data.resolved_url", url)
        if init_checkpoint is not None:
            client.log_param(parent_id, "init_checkpoint", str(init_checkpoint))
        client.log_dict(parent_id, cfg.model_dump(mode="json"), "config.json")
    job.update(parent_run_id=parent_id, data_url=url, config=cfg.model_dump(mode="json"))
    job.setdefault("stages", {})
    _write_json(job_file, job)

    previous = None if init_checkpoint is None else str(init_checkpoint)
    stage_run_ids = []
    for index, stage in enumerate(cfg.stages):
        record = job["stages"].setdefault(stage.name, {})
        if "run_id" not in record:
            run = client.create_run(
                tracking.experiment_id,
                run_name=f"stage{index + 1}-{stage.name}",
                tags={"mlflow.parentRunId": parent_id, "jin.stage": stage.name},
            )
            record["run_id"] = run.info.run_id
            client.log_param(record["run_id"], "stage.index", index + 1)
            for key, value in stage.model_dump(mode="json").items():
                client.log_param(record["run_id"], f"stage.{key}", value)
            _write_json(job_file, job)
        stage_run_ids.append(record["run_id"])
        if record.get("final_checkpoint"):
            previous = record["final_checkpoint"]
            print(f"[jin] stage {index + 1} {stage.name}: done earlier, skipping", flush=True)
            continue
        storage = output / "ray"
        resume_ckpt = latest_checkpoint(storage / stage_dirs[index]) if resume else None
        print(
            f"[jin] stage {index + 1}/{len(cfg.stages)} {stage.name}: {stage.steps} steps "
            f"(alpha={stage.alpha} beta={stage.beta} gamma={stage.gamma} zjepa={stage.zjepa})"
            + (f", resuming from {resume_ckpt}" if resume_ckpt else ""),
            flush=True,
        )
        trainer = TorchTrainer(
            train_stage_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "stage_index": index,
                "init_checkpoint": previous,
                "resume_checkpoint": str(resume_ckpt) if resume_ckpt else None,
                "stage_storage": str(storage / stage_dirs[index]),
                "mlflow": {"tracking_uri": tracking.tracking_uri, "run_id": record["run_id"]},
                "data_tally": tally_name,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.train.num_workers,
                use_gpu=use_gpu(cfg.train.use_gpu),
                resources_per_worker={"CPU": 1},
            ),
            run_config=RunConfig(
                name=stage_dirs[index],
                storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            ),
            datasets={"train": dataset},
        )
        stopped = storage / stage_dirs[index] / STOPPED
        stopped.unlink(missing_ok=True)  # from an earlier attempt of this job
        try:
            result = trainer.fit()
            _log_data_errors(client, record["run_id"], tally)
            if stopped.exists():
                last = result.checkpoint.path if result.checkpoint else "none yet"
                raise stopped_error(f"{stopped.read_text()} Last good checkpoint: {last}")
        except BaseException:
            client.set_terminated(record["run_id"], status="FAILED")
            client.set_terminated(parent_id, status="FAILED")
            raise
        # The stage's last checkpoint on storage, not Ray's result: Ray registers a reported
        # checkpoint on its next poll of the workers, so a job whose driver died just after the
        # last report resumes with a worker that restores the stage's end and reports nothing.
        final = latest_checkpoint(storage / stage_dirs[index])
        if final is None or _stage_step(final) != stage.steps:
            raise RuntimeError(
                f"stage {stage.name} finished without a checkpoint of its last step "
                f"({stage.steps}); the newest complete one is {final}"
            )
        previous = record["final_checkpoint"] = str(final)
        client.set_terminated(record["run_id"])
        _write_json(job_file, job)

    assert previous is not None
    evaluation = evaluate_checkpoint(previous, url, cfg.data)
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_metrics({k: v for k, v in evaluation.items() if isinstance(v, float)})
        mlflow.log_text(format_summary(evaluation), "evaluation.md")
        mlflow.log_artifacts(previous, "final_checkpoint")
        _log_loss_curves(client, stage_run_ids, output)
    job["final_checkpoint"] = previous
    _write_json(job_file, job)
    return PretrainResult(
        output, Path(previous), parent_id, stage_run_ids, evaluation, time.perf_counter() - started
    )


def _stage_step(checkpoint: Path) -> int | None:
    """The step within its stage that ``checkpoint`` was written after."""
    from jin_orchestrate.checkpoint import STATE

    return json.loads((checkpoint / STATE).read_text()).get("stage_step")


def _stage_dirs(cfg: Any) -> list[str]:
    """Each stage's folder below the job's ``ray/`` storage (`stage_dir_name`)."""
    from jin_orchestrate.checkpoint import stage_dir_name

    return [stage_dir_name(index, stage.name) for index, stage in enumerate(cfg.stages)]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _log_data_errors(client: Any, run_id: str, tally: Any) -> None:
    """The job's skipped-data counts so far, and the first error of each kind, printed and
    logged to the stage's MLflow run (metrics, and ``data_errors.json``)."""
    import ray

    from jin_orchestrate.data_faults import tally_metrics

    totals, first = ray.get([tally.totals.remote(), tally.first_errors.remote()])
    if totals:
        shown = ", ".join(f"{kind} {n}" for kind, n in sorted(totals.items()))
        total = sum(totals.values())
        print(f"[jin] data: {total} rows skipped so far in this job ({shown})", flush=True)
        for kind, message in sorted(first.items()):
            print(f"[jin] data: first {kind}: {message}", flush=True)
        client.log_dict(run_id, {"skipped_rows": totals, "first_errors": first}, "data_errors.json")
    for key, value in tally_metrics(totals).items():
        client.log_metric(run_id, key, value)


def _last_per_step(history: Sequence[Any]) -> dict[int, float]:
    """``{step: value}`` of an MLflow metric history, by step, the last value logged at each.

    A resumed stage (``--resume``, or Ray Train restarting its workers) runs the steps after its
    last checkpoint again and logs them a second time; MLflow keeps both. The later one is the
    run that went on to the final weights.
    """
    ordered = sorted(history, key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in ordered}


def _log_loss_curves(client: Any, run_ids: list[str], output: Path) -> None:
    """One PNG with the loss of every stage against the global step, as an MLflow artifact."""
    import mlflow

    from jin_orchestrate.plots import _pyplot, _save

    fig, ax = _pyplot().subplots(figsize=(7, 4))
    for run_id in run_ids:
        history = _last_per_step(client.get_metric_history(run_id, "loss"))
        if history:
            name = client.get_run(run_id).info.run_name
            ax.plot(list(history), list(history.values()), label=name)
    ax.set(xlabel="global step", ylabel="total loss (Eq. 7)", title="Jin pretraining")
    ax.legend()
    path = _save(fig, output / "loss_curves.png")
    mlflow.log_artifact(str(path))


def job_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides plus ``--num-workers`` and ``--data`` as overrides: the config is
    validated (the batch must split over the workers) with the worker count the job will run
    with, and records the shards it reads (``data.url``, which `checkpoint_source` reads back
    when a later job builds on one of its checkpoints, and a resume must repeat)."""
    workers = [] if args.num_workers is None else [f"train.num_workers={args.num_workers}"]
    data = [] if not args.data else [f"data.url={json.dumps(args.data)}"]  # quoted: '#', ': '
    return [*args.overrides, *workers, *data]


def checkpoint_source(args: argparse.Namespace) -> tuple[str, dict[str, Any], str]:
    """The local copy of ``--checkpoint``, its config and the data URL (``--data``, else the
    shards the checkpoint was trained on, its ``data.url``, else its NumberWorld corpus) of a job
    built on a trained model (``extend``, ``generate train``)."""
    from jin_orchestrate.checkpoint import read_config
    from jin_orchestrate.config import JinConfig
    from jin_orchestrate.data import default_corpus
    from jin_orchestrate.tracking import local_checkpoint

    source = local_checkpoint(args.checkpoint)
    base = read_config(source)
    data = JinConfig.model_validate(base).data
    return source, base, args.data or data.url or default_corpus(data)


def run_job_from_checkpoint(
    cfg: Any,
    args: argparse.Namespace,
    data_url: str | None,
    source: str,
    notes: Sequence[str] = (),
) -> int:
    """Run the job of ``cfg`` on top of checkpoint ``source`` with the shared job flags of
    :func:`add_job_arguments` (``extend``, ``generate train``) and print its closing summary."""
    from jin_orchestrate.evaluate import format_summary

    output = output_dir(args)
    try:  # cfg holds --num-workers already (`job_overrides`)
        if args.resume:  # the job's flags rebuilt the config: they must be the ones it started
            check_resumed_config(output / JOB_FILE, cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = run_pretraining(
        cfg,
        output=output,
        data_url=data_url,
        resume=args.resume,
        experiment=args.experiment,
        ray_address=args.ray_address,
        init_checkpoint=source,
    )
    print(format_summary(result.evaluation))
    print(f"checkpoint     {result.checkpoint}")
    print(f"mlflow run id  {result.parent_run_id}")
    for line in notes:
        print(line)
    print(f"wall time      {time.perf_counter() - started:.0f} s")
    return 0


def _job_config(args: argparse.Namespace, output: Path) -> Any:
    """The `JinConfig` of ``python -m jin_orchestrate.pretrain``: preset, ``--config``, ``--set``;
    with ``--resume``, the config in the job's ``job.json``, which those flags may only repeat."""
    from jin_orchestrate.config import DEFAULT_PRESET, load_config, preset, resolve_config

    if not args.resume:
        return load_config(args.preset or DEFAULT_PRESET, args.config, job_overrides(args))
    job_file = output / JOB_FILE
    base = preset(args.preset) if args.preset else _started_config(job_file)
    cfg = resolve_config(base, args.config, job_overrides(args))
    check_resumed_config(job_file, cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Parse flags, build the config, run the job and print the closing summary."""
    from jin_orchestrate.evaluate import format_summary
    from jin_orchestrate.train import JobStopped

    args = _parser().parse_args(argv)
    output = output_dir(args)
    try:
        cfg = _job_config(args, output)  # --num-workers included (`job_overrides`)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_pretraining(
            cfg,
            output=output,
            data_url=args.data,
            resume=args.resume,
            experiment=args.experiment,
            ray_address=args.ray_address,
        )
    except JobStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result.evaluation))
    print(f"checkpoint     {result.checkpoint}")
    print(f"mlflow run id  {result.parent_run_id} (stages: {', '.join(result.stage_run_ids)})")
    print(f"wall time      {result.wall_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
