"""A run killed mid-way and resumed ends where an uninterrupted run of the same config ends, in the
same folder and the same MLflow run. Real processes, a real SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow

# Dropout (resnet_small's head) and distortions (augment=light) draw random numbers after the resume too.
TASK = ["data.source.train_size=384", "data.source.val_size=64", "data.source.test_size=64", "data.batch_size=32",
        "data.num_workers=0", "trainer.max_epochs=3", "augment=light"]
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "NO_ALBUMENTATIONS_UPDATE": "1"}


def only_folder(root):
    folders = list((root / "outputs" / "runs").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def start(root, *overrides, env=ENV, **popen) -> subprocess.Popen:
    """A training of TASK under ``root``, its output captured."""
    return subprocess.Popen([sys.executable, "src/train.py", f"paths.root_dir={root}", *TASK, *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def in_the_second_epoch(process: subprocess.Popen, root, stop, pause: float = 0.5) -> str:
    """Call ``stop(process)`` once the first epoch's last.ckpt is there (renamed into place when whole) and
    ``pause`` seconds have passed (into the second epoch, which takes over a second); its output."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if list((root / "outputs" / "runs").glob("*/checkpoints/last.ckpt")):
            time.sleep(pause)
            stop(process)
            break
        time.sleep(0.02)
    return process.communicate(timeout=120)[0]


def killed_after_the_first_epoch(root, *overrides) -> str:
    """Start a run and SIGKILL it in its second epoch; its output."""
    process = start(root, *overrides)
    output = in_the_second_epoch(process, root, lambda p: p.send_signal(signal.SIGKILL))
    assert process.returncode == -signal.SIGKILL, output[-3000:]
    return output


def test_a_run_killed_after_an_epoch_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    straight = run_script("train.py", f"paths.root_dir={tmp_path / 'straight'}", *TASK)
    assert straight.returncode == 0, straight.stderr[-3000:]

    root = tmp_path / "interrupted"
    killed_after_the_first_epoch(root)
    folder = only_folder(root)
    assert not (folder / "metrics.json").exists()
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "RUNNING"  # SIGKILL: nothing could close it

    resumed = run_script("train.py", f"paths.root_dir={root}", *TASK, f"resume={folder}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_folder(root) == folder

    # the same numbers and weights as the uninterrupted run
    reference = only_folder(tmp_path / "straight")
    assert json.loads((folder / "metrics.json").read_text()) == pytest.approx(
        json.loads((reference / "metrics.json").read_text()), abs=1e-6)
    ours, theirs = (torch.load(f / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for f in (folder, reference))
    for name, value in theirs.items():
        assert torch.allclose(ours[name].float(), value.float(), atol=1e-6), name

    # one MLflow run, closed, whose per-epoch metrics continue at the right steps, once each
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FINISHED"
    reference_client = MlflowClient(f"sqlite:///{tmp_path / 'straight'}/mlflow.db")
    [reference_run] = reference_client.search_runs([reference_client.get_experiment_by_name("cnnlab").experiment_id])
    for metric in ("val/acc", "train/loss", "test/acc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == sorted(m.step for m in reference_client.get_metric_history(reference_run.info.run_id, metric))
    # the params as the first start logged them (the resumed start's resume= is not a param change)
    assert set(run.data.params) == set(reference_run.data.params) and run.data.params["resume"] == "None"


def test_an_interrupted_run_says_how_to_continue_it(tmp_path):
    """Ctrl-C after the first epoch: the console names the exact command that continues the run."""
    # as from a terminal: pytest-xdist's workers ignore SIGINT, and a child would inherit that
    process = start(tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    output = in_the_second_epoch(process, tmp_path, lambda p: p.send_signal(signal.SIGINT))
    assert process.returncode == 128 + signal.SIGINT and output.splitlines()[-1] == "Stopped (SIGINT).", output[-3000:]
    folder = only_folder(tmp_path)
    command = next(line.strip() for line in output.splitlines() if line.strip().startswith("python src/train.py"))
    assert command.endswith(f"resume={folder}") and "trainer.max_epochs=3" in command

    program, *arguments = command.split()  # "python": the one running these tests (CI puts no venv on PATH)
    assert program == "python"
    resumed = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (folder / "metrics.json").is_file() and only_folder(tmp_path) == folder


def only_run(root):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    return client, run


def test_slurm_requeue_requeues_the_job_and_the_requeued_job_continues_the_run(tmp_path):
    """`#SBATCH --signal=SIGUSR1@90`: SLURM's warning before the time limit. There is no SLURM here, so
    `scontrol` is a stand-in that records how it was called; the signal and everything after it are real."""
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (tools / "scontrol").chmod(0o755)
    env = {**ENV, "PATH": f"{tools}:{ENV['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train",
           "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}

    process = start(tmp_path, "resume=auto", env=env)  # the command an sbatch script runs, first and requeued
    output = in_the_second_epoch(process, tmp_path, lambda p: p.send_signal(signal.SIGUSR1))
    assert process.returncode == 128 + signal.SIGUSR1 and "Traceback" not in output, output[-3000:]
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    folder = only_folder(tmp_path)
    client, run = only_run(tmp_path)
    assert run.info.status == "KILLED" and not (folder / "metrics.json").exists()

    requeued = start(tmp_path, "resume=auto", env=env)
    output = requeued.communicate(timeout=300)[0]
    assert requeued.returncode == 0, output[-3000:]
    assert only_folder(tmp_path) == folder and (folder / "metrics.json").is_file()
    client, continued = only_run(tmp_path)
    assert continued.info.run_id == run.info.run_id and continued.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc")) == [11, 23, 35]


def test_sigterm_stops_the_run_in_seconds_and_it_continues_from_the_store_when_its_folder_is_gone(tmp_path):
    """SIGTERM (what `timeout`, `docker stop` and SLURM send) to the whole process group, the DataLoader worker
    too: the run stops within seconds, KILLED, its checkpoints logged. Then resume=runs:/<id> on a machine
    without the run's folder: its checkpoints come from the MLflow store. Before that, resume=auto with
    another config finds nothing of its own to continue and starts anew."""
    process = start(tmp_path, "data.num_workers=1", start_new_session=True)
    stopped_at = []
    output = in_the_second_epoch(process, tmp_path, lambda p: (os.killpg(p.pid, signal.SIGTERM),
                                                               stopped_at.append(time.monotonic())), pause=0.3)
    assert process.returncode == 128 + signal.SIGTERM and time.monotonic() - stopped_at[0] < 15, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Continue it, in the same folder and MLflow run, with:" in output
    folder = only_folder(tmp_path)
    client, stopped = only_run(tmp_path)
    assert stopped.info.status == "KILLED"
    assert "last/last.ckpt" in {a.path for a in client.list_artifacts(stopped.info.run_id, "last")}

    other = run_script("train.py", f"paths.root_dir={tmp_path}", *TASK, "trainer.max_epochs=1",
                       "data.source.train_size=64", "resume=auto")
    assert other.returncode == 0, other.stderr[-3000:]
    [new_folder] = set((tmp_path / "outputs" / "runs").iterdir()) - {folder}
    assert (new_folder / "metrics.json").is_file() and not (folder / "metrics.json").exists()

    shutil.rmtree(folder)
    resumed = run_script("train.py", f"paths.root_dir={tmp_path}", *TASK, f"resume=runs:/{stopped.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (folder / "metrics.json").is_file()  # the same folder, made again
    run = client.get_run(stopped.info.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test/acc"] == pytest.approx(
        json.loads((folder / "metrics.json").read_text())["test/acc"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/acc")) == [11, 23, 35]
