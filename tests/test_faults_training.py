"""Training under faults, as a real job: a worker killed by PID mid-stage, non-finite losses.

Each test runs ``python -m jin_orchestrate.pretrain`` (jin-test, one stage of 6 steps,
checkpoints every 2) with the fault drills of `jin_orchestrate.faults`.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from faultjobs import ONE_STAGE, start_job
from safetensors.torch import load_file

from jin_orchestrate.checkpoint import load_checkpoint
from jin_orchestrate.config import load_config
from jin_orchestrate.model import JinModel

pytestmark = pytest.mark.fault


def _final(job) -> tuple[dict, dict[str, torch.Tensor]]:
    final = Path(job.record()["final_checkpoint"])
    cfg = load_config("jin-test")
    state = load_checkpoint(final, JinModel(cfg.model), load_optimizer=False).state
    return state, load_file(final / "model.safetensors")


def test_a_worker_killed_mid_stage_resumes_from_its_checkpoint_and_matches(
    tmp_path, numberworld_url
):
    faults = tmp_path / "faults"
    # The uninterrupted run of the same seed, side by side (much of a job is waiting on Ray).
    reference = start_job(tmp_path, numberworld_url, name="reference")
    killed = start_job(
        tmp_path,
        numberworld_url,
        name="killed",
        env={"JIN_FAULT_PAUSE_AT": "within_modality:3", "JIN_FAULT_DIR": str(faults)},
    )
    pid_file = faults / "worker.pid"
    deadline = time.monotonic() + 400
    while not pid_file.exists():
        assert killed.process.poll() is None, killed.wait()[1][-4000:]
        assert time.monotonic() < deadline, "the worker never reached step 3"
        time.sleep(0.5)
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    code, output = killed.wait()
    assert code == 0, output[-4000:]
    # Steps 1-3 ran, the worker died after step 3, a new one restored step 2's checkpoint and
    # ran step 3 again: two distinct workers printed step 3.
    assert "within_modality resumes after step 2" in output, output[-4000:]
    third = {
        line.split(")")[0] for line in output.splitlines() if "within_modality step 3/6" in line
    }
    assert len(third) == 2, third
    assert "within_modality step 6/6" in output

    code, output = reference.wait()
    assert code == 0, output[-4000:]
    # Each progress line reaches the console once (Ray Train's print patch used to double it).
    assert output.count("within_modality step 6/6") == 1, output[-4000:]
    assert "Reporting training result" not in output  # Ray Train's metrics dumps stay quiet

    state_k, weights_k = _final(killed)
    state_r, weights_r = _final(reference)
    assert state_k["global_step"] == state_r["global_step"] == 6
    assert weights_k.keys() == weights_r.keys()
    diff = max((weights_k[k] - weights_r[k]).abs().max().item() for k in weights_k)
    print(f"max |w_killed - w_reference| = {diff:.3g}")
    assert diff == 0.0

    client, run = killed.stage_run()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert max(steps) == 6 and run.info.status == "FINISHED"


def test_non_finite_losses_are_skipped_counted_then_stop_the_job(tmp_path, numberworld_url):
    # Step 3: two NaN attempts (skipped, training goes on); step 5: NaN for good (the job stops
    # after max_nonfinite_steps=3 in a row, its step-4 checkpoint intact).
    job = start_job(
        tmp_path,
        numberworld_url,
        env={"JIN_FAULT_NONFINITE_AT": "within_modality:3:2,within_modality:5"},
    )
    code, output = job.wait()
    assert code != 0
    assert "loss was non-finite for 3 steps in a row (at step 4)" in output, output[-4000:]
    assert "Last good checkpoint:" in output
    assert "update skipped (2 in a row, 2 in all" in output
    assert "update skipped (2 in a row, 4 in all" in output  # the third in a row stops it

    client, run = job.stage_run()
    assert run.info.status == "FAILED"
    nonfinite = client.get_metric_history(run.info.run_id, "nonfinite_steps")
    assert max(m.value for m in nonfinite) == 5
    # Gradient clipping and the router z-loss were on while it happened.
    cfg = load_config("jin-test")
    assert cfg.train.grad_clip > 0 and cfg.model.backbone.z_loss_weight > 0

    last = output.split("Last good checkpoint: ")[1].split()[0]
    state = load_checkpoint(last, JinModel(cfg.model)).state
    assert state["global_step"] == 4 and state["nonfinite_total"] == 2


def test_a_batch_larger_than_a_workers_shard_stops_the_job_instead_of_hanging(
    tmp_path, numberworld_url
):
    # 200 samples, about 180 in the train split: one worker cannot fill a batch of 4096, and
    # with drop_last every epoch would be empty, forever. The job must say so and end, without
    # Ray Train retrying it (max_failures=2 here).
    config = {**ONE_STAGE, "train": {**ONE_STAGE["train"], "batch_size": 4096}}
    job = start_job(tmp_path, numberworld_url, config=config)
    code, output = job.wait(timeout=600)
    assert code == 1, output[-4000:]
    assert "epoch 0 gave no full batch of 4096 samples on this worker" in output, output[-4000:]
    assert "lower train.batch_size" in output
    assert "Last good checkpoint: none yet" in output
    assert output.count("gave no full batch") <= 2  # stated once (and echoed by Ray), not retried
    _, run = job.stage_run()
    assert run.info.status == "FAILED"
