"""``--resume`` continues a job under the config its job.json holds, and refuses flags that would
change it (pretrain, extend, generate train); no Ray or MLflow is started."""

from __future__ import annotations

import json

import pytest

from jin_orchestrate import extend, generate, pretrain
from jin_orchestrate.config import load_config


class Reached(Exception):
    """run_pretraining was called: the job would have started."""


@pytest.fixture
def runs(monkeypatch):
    """Stands in for `run_pretraining`: records each call and writes the job.json of a new job."""
    calls = []

    def fake(cfg, *, output, resume=False, **kwargs):
        calls.append({"cfg": cfg, "resume": resume})
        if not resume:
            output.mkdir(parents=True, exist_ok=True)
            record = {"config": cfg.model_dump(mode="json"), "data_url": "/data", "stages": {}}
            (output / pretrain.JOB_FILE).write_text(json.dumps(record))
        raise Reached

    monkeypatch.setattr(pretrain, "run_pretraining", fake)
    return calls


@pytest.fixture
def job(tmp_path):
    """A job started by ``pretrain --preset jin-test --set stages.2.steps=20``."""
    started = load_config("jin-test", overrides=["stages.2.steps=20"])
    record = {"config": started.model_dump(mode="json"), "data_url": "/data", "stages": {}}
    (tmp_path / "job.json").write_text(json.dumps(record))
    return tmp_path, started


def test_pretrain_resume_runs_the_jobs_own_config(job, runs):
    """README: `pretrain --resume` continues the job; its preset and --set values are the job's,
    not the command line's defaults (jin-tiny). Flags that repeat them, and another worker count,
    are fine."""
    output, started = job
    for extra in (
        [],
        ["--set", "stages.2.steps=20"],
        ["--preset", "jin-test", "--set", "stages.2.steps=20"],
        ["--num-workers", "4"],
    ):
        with pytest.raises(Reached):
            pretrain.main(["--resume", "--output", str(output), *extra])
        cfg = runs[-1]["cfg"]
        assert runs[-1]["resume"], extra
        assert cfg.model_dump(exclude={"train": {"num_workers"}}) == started.model_dump(
            exclude={"train": {"num_workers"}}
        ), extra
    assert runs[-1]["cfg"].train.num_workers == 4


@pytest.mark.parametrize("resume", [False, True])
def test_a_worker_count_the_batch_does_not_split_over_is_refused(job, runs, capsys, resume):
    """jin-test's batch of 8 over 3 workers used to train with 3 x 2 = 6 samples a step (and 16
    workers with 16), without a word; it is refused before the job starts, naming both values."""
    output, _ = job
    argv = ["--resume", "--output", str(output)] if resume else ["--preset", "jin-test"]
    for workers in ("3", "16"):
        assert pretrain.main([*argv, "--num-workers", workers]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "train.batch_size (8)" in err, err
        assert f"train.num_workers ({workers})" in err, err
    # the flag was set on the config outside the error handling: a traceback, not an error line
    assert pretrain.main([*argv, "--num-workers", "0"]) == 2
    assert "num_workers" in (err := capsys.readouterr().err) and "greater than 0" in err, err
    assert runs == []


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--preset", "jin-tiny"], ["preset: 'jin-test' -> 'jin-tiny'", "model.dim: 32 -> 128"]),
        (["--set", "stages.2.steps=280"], ["stages.2.steps: 20 -> 280"]),
        (["--preset", "jin-test"], ["stages.2.steps: 20 -> 2"]),
        (["--set", "train.lr=0.01", "--set", "stages.0.alpha=2"], ["train.lr", "stages.0.alpha"]),
    ],
)
def test_pretrain_resume_refuses_flags_that_change_the_config(job, runs, capsys, extra, named):
    output, _ = job
    before = (output / "job.json").read_text()
    assert pretrain.main(["--resume", "--output", str(output), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:"), err
    for text in named:
        assert text in err, err
    assert runs == []  # refused before Ray or MLflow
    assert (output / "job.json").read_text() == before


def test_a_job_started_with_an_uneven_split_resumes_with_a_worker_count_that_divides(
    job, runs, capsys
):
    """A job.json written before the split was checked (batch 8 over 3 workers) is refused as
    it is and resumed with --num-workers that divide the batch, everything else its own."""
    output, started = job
    record = json.loads((output / "job.json").read_text())
    record["config"]["train"]["num_workers"] = 3
    (output / "job.json").write_text(json.dumps(record))
    assert pretrain.main(["--resume", "--output", str(output)]) == 2
    assert "train.num_workers (3)" in capsys.readouterr().err
    with pytest.raises(Reached):
        pretrain.main(["--resume", "--output", str(output), "--num-workers", "2"])
    assert runs[-1]["cfg"].train.num_workers == 2
    assert runs[-1]["cfg"].model_dump(exclude={"train": {"num_workers"}}) == started.model_dump(
        exclude={"train": {"num_workers"}}
    )


def test_pretrain_resume_refuses_a_config_file_that_changes_the_config(job, runs, capsys):
    output, _ = job
    path = output / "other.yaml"
    path.write_text("train:\n  batch_size: 4\n")
    assert pretrain.main(["--resume", "--output", str(output), "--config", str(path)]) == 2
    assert "train.batch_size: 8 -> 4" in capsys.readouterr().err
    assert runs == []


def test_run_pretraining_refuses_to_resume_under_another_config(job, monkeypatch):
    """Called as a library, the check comes before MLflow, Ray or the corpus are touched."""

    def started(*args, **kwargs):
        raise RuntimeError("the job started")

    monkeypatch.setattr("jin_orchestrate.tracking.resolve_tracking", started)
    monkeypatch.setattr("jin_orchestrate.cluster.init_ray", started)
    monkeypatch.setattr("jin_orchestrate.data.default_corpus", started)
    output, _ = job
    before = (output / "job.json").read_text()
    other = load_config("jin-test", overrides=["stages.2.steps=20", "train.seed=1"])
    with pytest.raises(ValueError, match=r"train\.seed: 0 -> 1") as err:
        pretrain.run_pretraining(other, output=output, resume=True)
    assert "stages" not in str(err.value)
    assert (output / "job.json").read_text() == before


def _extend_argv(checkpoint, output):
    return [
        "--checkpoint",
        str(checkpoint),
        "--data",
        "/data",
        "--modality",
        "imu",
        "--input-dim",
        "6",
        "--output",
        str(output),
    ]


def _generate_argv(checkpoint, output):
    return ["train", "--checkpoint", str(checkpoint), "--data", "/data", "--output", str(output)]


@pytest.mark.parametrize(
    ("command", "argv", "changed", "named"),
    [
        (extend.main, _extend_argv, ["--steps", "7"], "stages.0.steps: 6 -> 7"),
        (extend.main, _extend_argv, ["--set", "train.lr=0.5"], "train.lr: 0.001 -> 0.5"),
        (generate.main, _generate_argv, ["--lr", "1e-4"], "stages.0.lr: 0.002 -> 0.0001"),
    ],
)
def test_extend_and_generate_train_resume_only_with_the_flags_they_started_with(
    checkpoint, tmp_path, monkeypatch, runs, capsys, command, argv, changed, named
):
    """Their config is rebuilt from the checkpoint and the flags, so on --resume the flags must
    be the ones the job started with; others are refused, naming the keys, before the job."""
    monkeypatch.setattr(extend, "check_column", lambda *args: None)  # no shards here
    output = tmp_path / "job"
    with pytest.raises(Reached):
        command([*argv(checkpoint, output), "--steps", "6"])
    started = runs[0]["cfg"]
    with pytest.raises(Reached):  # the same flags again: the job goes on
        command([*argv(checkpoint, output), "--steps", "6", "--resume"])
    assert runs[1]["resume"] and runs[1]["cfg"] == started
    capsys.readouterr()
    assert command([*argv(checkpoint, output), "--steps", "6", *changed, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and named in err, err
    assert len(runs) == 2


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        (pretrain.main, lambda checkpoint, output: ["--output", str(output)]),
        (extend.main, _extend_argv),
        (generate.main, _generate_argv),
    ],
    ids=["pretrain", "extend", "generate-train"],
)
def test_the_split_is_checked_with_the_worker_count_the_job_runs_with(
    checkpoint, tmp_path, monkeypatch, runs, capsys, command, argv
):
    """A batch of 9 over 2 workers (jin-tiny's count; for extend and generate train, a checkpoint
    trained on 2, as `--set` says here) was refused before --num-workers 3 applied."""
    monkeypatch.setattr(extend, "check_column", lambda *args: None)  # no shards here
    flags = ["--set", "train.batch_size=9"]
    if command is not pretrain.main:
        flags += ["--set", "train.num_workers=2"]
    with pytest.raises(Reached):
        command([*argv(checkpoint, tmp_path / "job"), *flags, "--num-workers", "3"])
    assert (runs[-1]["cfg"].train.batch_size, runs[-1]["cfg"].train.num_workers) == (9, 3)
    assert command([*argv(checkpoint, tmp_path / "other"), *flags]) == 2
    assert "train.batch_size (9)" in capsys.readouterr().err


def test_the_loss_curve_of_a_resumed_stage_has_each_step_once(tmp_path, monkeypatch):
    """A resumed stage logs the steps after its last checkpoint again (MLflow keeps both); the
    job's loss-curve PNG drew them twice, the line running back; it keeps the later value."""
    import types

    import mlflow
    from matplotlib.axes import Axes
    from mlflow.entities import Metric

    killed = [Metric("loss", v, t, s) for s, v, t in [(1, 1.0, 10), (2, 0.9, 11), (3, 0.8, 12)]]
    resumed = [Metric("loss", v, t, s) for s, v, t in [(3, 0.7, 20), (4, 0.6, 21)]]
    client = types.SimpleNamespace(
        get_metric_history=lambda run_id, key: killed + resumed,
        get_run=lambda run_id: types.SimpleNamespace(info=types.SimpleNamespace(run_name="s1")),
    )
    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(
        Axes, "plot", lambda ax, x, y, **kw: drawn.append((x, y)) or plot(ax, x, y, **kw)
    )
    monkeypatch.setattr(mlflow, "log_artifact", lambda path: None)
    pretrain._log_loss_curves(client, ["run"], tmp_path)
    assert drawn == [([1, 2, 3, 4], [1.0, 0.9, 0.7, 0.6])]
    assert (tmp_path / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
