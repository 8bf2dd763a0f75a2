"""``python -m jin_orchestrate.pretrain`` and `run_pretraining`: what they refuse before Ray or
MLflow start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jin_orchestrate import pretrain
from jin_orchestrate.config import JinConfig, load_config


class Started(Exception):
    """The job went on past its checks."""


def _started(*args, **kwargs):
    raise Started


@pytest.mark.parametrize("name", ["a/b", "x/../../../outside", "a\\b", ""])
def test_a_stage_name_that_is_not_one_path_component_is_refused(
    tmp_path, monkeypatch, capsys, name
):
    """A stage's name is part of its checkpoint folder below the job's ray/ storage: a '/' nested
    it, and with '..' Ray Train wrote the stage's checkpoints outside the job."""
    monkeypatch.setattr(pretrain, "run_pretraining", _started)
    output = tmp_path / "job"
    argv = ["--preset", "jin-test", "--output", str(output), "--set", f"stages.1.name={name}"]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert "stages.1.name" in err
    assert ("checkpoint folder" if name else "at least 1 character") in err
    assert not output.exists()
    with pytest.raises(ValueError, match=r"stages\.1\.name"):  # the library's config, alike
        load_config("jin-test", overrides=[f"stages.1.name={name}"])


def test_data_is_recorded_in_the_config_for_resume_and_for_jobs_built_on_the_checkpoint(
    tmp_path, monkeypatch, capsys
):
    """``--data`` was not in the config (``data.url`` stayed None and was never read): a job
    built on such a checkpoint without ``--data`` (extend, generate train) silently read
    NumberWorld, and ``--resume --data OTHER`` switched the job's data."""
    seen = []

    def record(cfg, **kwargs):
        seen.append((cfg, kwargs["data_url"]))
        raise Started

    monkeypatch.setattr(pretrain, "run_pretraining", record)
    output = tmp_path / "job"
    url = "memory://shards/a#b: c"  # '#' and ': ' would end or split an unquoted YAML value
    base = ["--preset", "jin-test", "--output", str(output)]
    with pytest.raises(Started):
        pretrain.main([*base, "--data", url])
    cfg, data_url = seen[-1]
    assert cfg.data.url == url == data_url
    output.mkdir()
    (output / pretrain.JOB_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    assert pretrain.main([*base, "--resume", "--data", "memory://other"]) == 2
    assert "data.url" in capsys.readouterr().err
    with pytest.raises(Started):  # the job's own data, from its config
        pretrain.main(["--output", str(output), "--resume"])
    assert seen[-1][0].data.url == url
    # A job built on a checkpoint of it reads the same shards unless told otherwise.
    monkeypatch.setattr(
        "jin_orchestrate.tracking.local_checkpoint", lambda checkpoint: str(checkpoint)
    )
    monkeypatch.setattr(
        "jin_orchestrate.checkpoint.read_config", lambda source: cfg.model_dump(mode="json")
    )
    monkeypatch.setattr("jin_orchestrate.data.default_corpus", _started)
    args = pretrain.argparse.Namespace(checkpoint="ckpt", data=None)
    assert pretrain.checkpoint_source(args)[2] == url
    assert (
        pretrain.checkpoint_source(pretrain.argparse.Namespace(checkpoint="c", data="x"))[2] == "x"
    )


class _UnregisteredTrainer:
    """Stands in for `TorchTrainer`: its worker leaves the stage's last checkpoint on storage
    and Ray's result does not name it, as when the driver died within Ray's poll of the last
    report and the resumed worker restored the stage's end and reported nothing."""

    def __init__(self, fn, *, train_loop_config, **kwargs):
        self.loop = train_loop_config

    def fit(self):
        import types

        from jin_orchestrate.config import JinConfig
        from jin_orchestrate.model import JinModel
        from jin_orchestrate.train import StageTrainer

        cfg = JinConfig.model_validate(self.loop["config"])
        stage = cfg.stages[self.loop["stage_index"]]
        trainer = StageTrainer.create(cfg, stage, JinModel(cfg.model))
        trainer.step = trainer.global_step = stage.steps
        storage = Path(self.loop["stage_storage"])
        trainer.save(storage / "checkpoint_2026-12-07_10-00-00.000000", 1, 2)
        return types.SimpleNamespace(checkpoint=None)


def test_a_stage_ends_with_its_last_checkpoint_on_storage_when_ray_did_not_register_it(
    ray_local, corpus_url, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the MLflow store
    monkeypatch.setattr("ray.train.torch.TorchTrainer", _UnregisteredTrainer)
    data = load_config("jin-test", overrides=["train.num_workers=1"]).model_dump(mode="json")
    data["stages"] = [{**data["stages"][0], "steps": 2}]
    cfg = JinConfig.model_validate(data)
    result = pretrain.run_pretraining(cfg, output=tmp_path / "job", data_url=corpus_url)
    final = (
        tmp_path
        / "job"
        / "ray"
        / "stage1-within_modality"
        / "checkpoint_2026-12-07_10-00-00.000000"
    )
    assert result.checkpoint == final
    job = json.loads((tmp_path / "job" / pretrain.JOB_FILE).read_text())
    assert job["stages"]["within_modality"]["final_checkpoint"] == str(final)
