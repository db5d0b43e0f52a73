"""Sweeps as users start them: parallel jobs on one SQLite store, an Optuna search, submitit, the SLURM preset.

Real `python src/train.py -m ...` processes in tiny settings; what they tracked is read back through
MlflowClient. About 2 minutes on 2 cores.
"""

import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, tiny_overrides

# Jobs run side by side on two cores: one torch thread each.
ENV = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNLAB_RUN_ID")},
       "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


def sweep(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "src/train.py", "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def the_sweep_folder(root):
    (folder,) = (root / "outputs" / "multirun").iterdir()  # one sweep, one folder
    return folder


def runs_of(root, experiment="cnnlab"):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def artifacts(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


def table_rows(output: str, count: int) -> list[str]:
    """The summary table's job rows, as printed at the end of the sweep."""
    lines = output.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("Sweep of "))
    assert re.search(r"job\s+overrides\s+val/acc_best\s+test/acc\s+run folder\s+MLflow run id", lines[start + 1])
    return lines[start + 3:start + 3 + count]


@pytest.mark.slow
def test_parallel_sweep_on_a_fresh_store_tracks_every_job(tmp_path):
    """Four jobs at once (joblib, four processes) on a SQLite store that does not exist yet: every run,
    param, metric and checkpoint arrives, and nothing reports a locked database or a table made twice."""
    result = sweep("hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "model=resnet18,mobilenet_v2", "seed=1,2",
                   *tiny_overrides(tmp_path))
    output = result.stdout + result.stderr
    assert not re.search(r"database is locked|already exists", output, re.IGNORECASE), output[-4000:]

    folder = the_sweep_folder(tmp_path)  # every job under the folder the sweep made (not one per worker)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    client, runs = runs_of(tmp_path)
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
    assert sorted((run.data.params["model.name"], run.data.params["seed"]) for run in runs) == [
        ("mobilenet_v2", "1"), ("mobilenet_v2", "2"), ("resnet18", "1"), ("resnet18", "2")]
    by_id = {run.info.run_id: run for run in runs}
    rows = table_rows(result.stdout, 4)
    for job in range(4):
        job_dir = folder / str(job)
        run_id = torch.load(job_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["mlflow_run_id"]
        run = by_id.pop(run_id)  # each folder its own run
        assert run.data.params["trainer.max_epochs"] == "1" and run.data.params["data.source.train_size"] == "64"
        assert {"train/loss", "val/acc", "test/acc", "test/f1"} <= set(run.data.metrics)
        assert run.data.metrics["test/acc"] == pytest.approx(json.loads((job_dir / "metrics.json").read_text())["test/acc"])
        assert {"best/best.ckpt", "last/last.ckpt", "config.yaml"} <= set(artifacts(client, run_id))
        row = next(r for r in rows if r.split()[-1] == run_id)  # the summary names the job, its folder and run
        assert str(job_dir.relative_to(tmp_path)) in row.replace(str(tmp_path) + "/", "")
        assert re.search(rf"^\*?\s+{job}\s", row)
    assert (folder / "summary.txt").read_text().strip() in result.stdout


@pytest.mark.slow
def test_optuna_search_optimises_validation_accuracy(tmp_path):
    """hparams_search=shapes_optuna, three trials: each an MLflow run, scored by its best validation accuracy,
    and the best trial marked in the table and named by Optuna's results."""
    result = sweep("hparams_search=shapes_optuna", "hydra.sweeper.n_trials=3", *tiny_overrides(tmp_path))
    folder = the_sweep_folder(tmp_path)
    client, runs = runs_of(tmp_path)
    assert len(runs) == 3 and all(run.info.status == "FINISHED" for run in runs)

    scores = {}
    for job in range(3):
        best = torch.load(folder / str(job) / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
        run = next(r for r in runs if r.info.run_id == best["mlflow_run_id"])
        scores[job] = max(m.value for m in client.get_metric_history(run.info.run_id, "val/acc"))
        overrides = (folder / str(job) / ".hydra" / "overrides.yaml").read_text()
        lr = re.search(r"optimizer\.lr=([\d.e-]+)", overrides).group(1)  # the trial's value reached its run
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(float(lr))
    from omegaconf import OmegaConf
    optimum = OmegaConf.load(folder / "optimization_results.yaml")
    assert optimum.best_value == pytest.approx(max(scores.values()))  # the objective is the validation accuracy

    rows = table_rows(result.stdout, 3)
    (marked,) = [row for row in rows if row.startswith("*")]
    best_job = int(marked.split()[1])
    assert scores[best_job] == pytest.approx(optimum.best_value)
    assert f"Best: job {best_job}, val/acc_best {optimum.best_value:.4f}" in result.stdout


@pytest.mark.slow
def test_submitit_local_jobs_share_the_sweep_folder(tmp_path):
    """submitit's local executor runs each job as its own process, as SLURM would: they land in the sweep's folder."""
    result = sweep("hydra/launcher=submitit_local", "seed=1,2", *tiny_overrides(tmp_path))
    folder = the_sweep_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    assert all((folder / job / "metrics.json").is_file() for job in ("0", "1"))
    assert len(runs_of(tmp_path)[1]) == 2
    assert len(table_rows(result.stdout, 2)) == 2


def test_slurm_launcher_config_composes_into_an_sbatch_script(compose, tmp_path, monkeypatch):
    """hydra/launcher=slurm composes, its parameters pass submitit's own checks, and the sbatch script says them."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    import cnnlab  # noqa: F401  the config's resolvers

    cfg = compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                  "hydra.launcher.setup=[source .venv/bin/activate]", "hydra.job.name=train", "model=resnet50",
                  return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    assert params["partition"] == "gpu" and params["timeout_min"] > 0 and params["tasks_per_node"] == 1

    # The executor as Hydra's launcher builds it (submitit looks for srun on PATH: a stand-in that never runs).
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "%j",
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in base else f"slurm_{key}": value for key, value in params.items()
                                  if key not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", f"#SBATCH --time={params['timeout_min']}",
                 f"#SBATCH --cpus-per-task={params['cpus_per_task']}", "#SBATCH --job-name=train",
                 "source .venv/bin/activate"):
        assert line in script, script
