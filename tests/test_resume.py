"""A run killed mid-way and resumed ends where an uninterrupted run of the same config ends, in the
same folder and the same MLflow run. Real processes, a real SIGKILL."""

import json
import os
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
TASK = ["data.source.train_size=512", "data.source.val_size=64", "data.source.test_size=64", "data.batch_size=32",
        "data.num_workers=0", "trainer.max_epochs=3", "augment=light"]
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "NO_ALBUMENTATIONS_UPDATE": "1"}


def only_folder(root):
    folders = list((root / "outputs" / "runs").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def killed_after_the_first_epoch(root) -> str:
    """Start a run and SIGKILL it in its second epoch, once the first one's last.ckpt is there; its output."""
    process = subprocess.Popen([sys.executable, "src/train.py", f"paths.root_dir={root}", *TASK], cwd=ROOT, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if list((root / "outputs" / "runs").glob("*/checkpoints/last.ckpt")):  # renamed into place when whole
            time.sleep(0.5)  # into the second epoch (an epoch takes over a second)
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    output = process.communicate(timeout=60)[0]
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
    process = subprocess.Popen([sys.executable, "src/train.py", f"paths.root_dir={tmp_path}", *TASK], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if list((tmp_path / "outputs" / "runs").glob("*/checkpoints/last.ckpt")):
            time.sleep(0.5)  # into the second epoch: training, not writing the checkpoint
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 1, output[-3000:]
    folder = only_folder(tmp_path)
    command = next(line.strip() for line in output.splitlines() if line.strip().startswith("python src/train.py"))
    assert command.endswith(f"resume={folder}") and "trainer.max_epochs=3" in command

    program, *arguments = command.split()  # "python": the one running these tests (CI puts no venv on PATH)
    assert program == "python"
    resumed = subprocess.run([sys.executable, *arguments], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (folder / "metrics.json").is_file() and only_folder(tmp_path) == folder


def test_sigterm_stops_the_run_in_seconds_marks_it_killed_and_keeps_its_checkpoint(tmp_path):
    """What `timeout`, `docker stop` and SLURM send, to the whole process group (the DataLoader worker too)."""
    task = [o if o != "data.num_workers=0" else "data.num_workers=1" for o in TASK]
    process = subprocess.Popen([sys.executable, "src/train.py", f"paths.root_dir={tmp_path}", *task], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if list((tmp_path / "outputs" / "runs").glob("*/checkpoints/last.ckpt")):
            time.sleep(0.3)
            os.killpg(process.pid, signal.SIGTERM)
            stopped_at = time.monotonic()
            break
        time.sleep(0.02)
    output = process.communicate(timeout=60)[0]
    assert process.returncode not in (0, None) and time.monotonic() - stopped_at < 15, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Continue it, in the same folder and MLflow run, with:" in output

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "KILLED"
    assert "last/last.ckpt" in {a.path for a in client.list_artifacts(run.info.run_id, "last")}
