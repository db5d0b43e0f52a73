"""A run's folder, checkpoints and numbers are its own: checked with real second processes and real trainings."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_script, tiny_overrides

pytestmark = pytest.mark.slow

# Two processes at a time on two cores: one torch thread each (two each spin against each other, 4x slower).
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "NO_ALBUMENTATIONS_UPDATE": "1",
       "OMP_NUM_THREADS": "1"}

# A run as from a terminal, except that Hydra names its run folder (in run_job, after composing the
# config) only once the test says go, just after a second begins: two such runs name their folders
# within milliseconds of each other, in the same second, however busy the machine.
SAME_SECOND = """
import pathlib, runpy, sys, time
import hydra._internal.hydra as hydra_internal
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
name_the_folder = hydra_internal.run_job

def when_told(*args, **kwargs):
    ready.touch()
    while not go.exists() or not go.read_text():
        time.sleep(0.005)
    time.sleep(max(0.0, float(go.read_text()) - time.time()))
    return name_the_folder(*args, **kwargs)

hydra_internal.run_job = when_told
sys.argv = ["src/train.py", *sys.argv[3:]]
runpy.run_path("src/train.py", run_name="__main__")
"""


def test_runs_started_in_the_same_second_get_their_own_folders_and_artifacts(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(store).create_experiment("cnnlab", artifact_location=(tmp_path / "mlartifacts").as_uri())
    ready, go = [tmp_path / f"ready{seed}" for seed in (1, 2)], tmp_path / "go"
    commands = [[sys.executable, "-c", SAME_SECOND, str(ready[i]), str(go), *tiny_overrides(tmp_path), f"seed={seed}"]
                for i, seed in enumerate((1, 2))]
    processes = [subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in processes), "a run ended before it was ready"
        time.sleep(0.05)
    go.write_text(str(math.floor(time.time()) + 1.05))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]

    folders = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(folders) == 2
    assert folders[0].name[:19] == folders[1].name[:19]  # the same second: the token tells them apart
    runs = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("cnnlab").experiment_id])
    assert len(runs) == 2
    for folder in folders:
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no -v1
        best = torch.load(folder / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        run = next(r for r in runs if r.info.run_id == best["mlflow_run_id"])  # the folder's checkpoint is its run's
        assert json.loads((folder / "metrics.json").read_text())["test/acc"] == pytest.approx(
            run.data.metrics["test/acc"])
    # (that every run's logged checkpoints download and load: tests/test_concurrency.py, four runs at once)


def test_last_checkpoint_is_the_last_epoch_when_validation_never_improves(tmp_path):
    """Lightning 2.6 rewrites last.ckpt only with a new best; a learning rate of 1e-12 never gives one."""
    result = run_script("train.py", *tiny_overrides(tmp_path), "trainer.max_epochs=3", "optimizer.lr=1e-12",
                        "logger=none")
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "outputs" / "runs").iterdir()
    best, last = (torch.load(folder / "checkpoints" / f"{name}.ckpt", map_location="cpu", weights_only=True)
                  for name in ("best", "last"))
    steps_per_epoch = 64 // 16
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == 3 * steps_per_epoch


def test_results_do_not_depend_on_the_number_of_dataloader_workers(tmp_path):
    """Augmentation, shuffling and dropout draw from the seed, not from whichever worker loads an image."""
    def train(workers: int) -> subprocess.Popen:
        overrides = [o for o in tiny_overrides(tmp_path / f"w{workers}") if not o.startswith("data.num_workers")]
        return subprocess.Popen([sys.executable, "src/train.py", *overrides, f"data.num_workers={workers}",
                                 "augment=light", "trainer.max_epochs=2", "logger=none"],
                                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    metrics = {}
    for batch in ((0, 1), (3,)):  # two at a time on two cores
        processes = {workers: train(workers) for workers in batch}
        for workers, process in processes.items():
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
            (folder,) = (tmp_path / f"w{workers}" / "outputs" / "runs").iterdir()
            metrics[workers] = json.loads((folder / "metrics.json").read_text())
    assert metrics[0]["test/acc"] > 0  # something was learnt and measured
    for workers in (1, 3):
        assert metrics[workers] == pytest.approx(metrics[0], abs=1e-6), workers
