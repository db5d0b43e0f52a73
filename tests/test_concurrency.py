"""Trainings started at once on one store: every run, param, metric and artifact arrives, each in its own folder.

Four real `python src/train.py` processes in tiny settings, on the default SQLite store (which they create, at
once) and on a real `mlflow server` started here; what they tracked is read back through MlflowClient and
checked against what each run wrote itself: its config (config.yaml), its per-epoch lines (train.log), its test
numbers (metrics.json) and its checkpoints. About 100 s of CPU time, most of it the eight trainings' imports:
1 min 42 s measured on 2 cores that other work was also using.
"""

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from cnnlab.tracking import flatten
from cnnlab.training.module import ImageClassifier
from conftest import ROOT, tiny_overrides, wait_for_http

pytestmark = pytest.mark.slow

# Four processes on two cores: one torch thread each.
ENV = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNLAB_RUN_ID")},
       "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
EPOCHS = 2
JOBS = [(1, "0.001"), (2, "0.002"), (3, "0.003"), (4, "0.004")]  # seed, learning rate: each run's params differ
# What no run's or server's output may say: a lock given up on, a table or experiment made twice, a call
# retried, a crash; and, in the server's access log, a request it failed.
TROUBLE = re.compile(r"database is locked|already exists|Retrying|Traceback|Max retries", re.IGNORECASE)
SERVER_ERROR = re.compile(r'HTTP/1\.[01]" 5\d\d')


def start_all(commands: list[list[str]], logs: list[Path], cwd: Path) -> list[int]:
    """Start every command at once, each writing to its log; their exit statuses (all killed if one hangs)."""
    processes = []
    try:
        for command, log in zip(commands, logs):
            with log.open("w") as out:
                processes.append(subprocess.Popen(command, cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT))
        return [process.wait(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def train_four(root: Path, *overrides: str) -> None:
    """Four trainings started at once, two epochs each (seeds 1-4, learning rates 0.001-0.004); all must succeed.
    Each logs and registers its model under the same name at the same moment."""
    logs = [root / f"job{seed}.out" for seed, _ in JOBS]
    statuses = start_all([[sys.executable, "src/train.py", *tiny_overrides(root), f"trainer.max_epochs={EPOCHS}",
                           f"seed={seed}", f"optimizer.lr={lr}", "mlflow_model.log=true", *overrides]
                          for seed, lr in JOBS], logs, ROOT)
    for status, log in zip(statuses, logs):
        output = log.read_text()
        assert status == 0 and not TROUBLE.search(output), output[-4000:]


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def epoch_lines(log: str) -> list[dict[str, float]]:
    """The metrics the run printed for each epoch (EpochLog): [{"train/acc": 0.125, "val/loss": 2.3, ...}, ...]."""
    lines = re.findall(rf"epoch (\d+)/{EPOCHS}: train (.*?) \| val (.*?) \(", log)
    assert [int(epoch) for epoch, _, _ in lines] == list(range(1, EPOCHS + 1)), log
    epochs = []
    for _, train, val in lines:
        values = {}
        for split, text in (("train", train), ("val", val)):
            words = text.split()
            values |= {f"{split}/{name}": float(value) for name, value in zip(words[::2], words[1::2])}
        epochs.append(values)
    return epochs


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_four_runs(client: MlflowClient, root: Path, downloads: Path) -> list:
    """Four FINISHED runs, each with its whole config as params, every epoch's metrics, its test metrics, its
    checkpoints and config as artifacts, and a run folder of its own whose files agree with all of it."""
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert len(runs) == 4
    assert all(run.info.status == "FINISHED" for run in runs)
    assert sorted((run.data.params["seed"], run.data.params["optimizer.lr"]) for run in runs) == [
        (str(seed), lr) for seed, lr in JOBS]
    # Params beyond the config (the data cache, parameter counts) are logged by every run alike: none may lose any.
    assert len({frozenset(run.data.params) for run in runs}) == 1

    folders = sorted((root / "outputs" / "runs").iterdir())
    assert len(folders) == 4
    seen = set()
    for run in runs:
        run_id, params, metrics = run.info.run_id, run.data.params, run.data.metrics
        folder = Path(params["callbacks.checkpoint.dirpath"]).parent  # where the run says its folder is
        assert folder in folders and folder not in seen  # four runs, four folders
        seen.add(folder)
        assert f"seed={params['seed']}" in OmegaConf.load(folder / ".hydra" / "overrides.yaml")  # the folder's run

        # Every artifact, downloaded through the store: the config and the folder's checkpoints.
        artifacts = Path(client.download_artifacts(run_id, "", str(downloads / run_id)))
        checkpoints = sorted((folder / "checkpoints").glob("*.ckpt"))
        assert checkpoints and {"config.yaml"} | {f"{c.stem}/{c.name}" for c in checkpoints} <= files_under(artifacts)

        # Every param the run logged from its config, with its value.
        config = {name: value for name, value in
                  flatten(OmegaConf.to_container(OmegaConf.load(artifacts / "config.yaml"))).items()
                  if value != {}}  # an empty group (augment=none, tags) has no key to log, and Lightning logs none
        assert {name: params.get(name) for name in config} == {name: str(value) for name, value in config.items()}

        # Every epoch's metrics, once per epoch at that epoch's step, with the values the run printed.
        printed = epoch_lines((folder / "train.log").read_text())
        sizes = {"params_total", "params_trainable"}  # logged once, at the start (as params too)
        assert {name: metrics[name] for name in sizes} == {name: float(params[name]) for name in sizes}
        per_epoch = {name for name in metrics if not name.startswith("test/") and name not in {"epoch", *sizes}}
        assert set(printed[0]) <= per_epoch
        steps = None
        for name in sorted(per_epoch):
            history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
            assert len(history) == EPOCHS, (name, history)
            if name in printed[0]:
                assert [m.value for m in history] == pytest.approx([e[name] for e in printed], abs=5e-5), name
                assert steps in (None, [m.step for m in history]), name  # the same step for all, per epoch
                steps = [m.step for m in history]
        assert steps == sorted(set(steps))

        # The test metrics, once each, as the run folder's metrics.json has them.
        tested = OmegaConf.to_container(OmegaConf.load(folder / "metrics.json"))
        assert tested and {name for name in metrics if name.startswith("test/")} == set(tested)
        for name, value in tested.items():
            history = client.get_metric_history(run_id, name)
            assert len(history) == 1 and history[0].value == pytest.approx(value), name

        # The checkpoints as stored: the folder's bytes, the run's own, and they load into a working model.
        for checkpoint in checkpoints:
            copy = artifacts / checkpoint.stem / checkpoint.name
            assert sha256(copy) == sha256(checkpoint)
            assert torch.load(copy, map_location="cpu", weights_only=True)["mlflow_run_id"] == run_id
            model = ImageClassifier.load_from_checkpoint(copy, map_location="cpu").eval()
            with torch.no_grad():
                logits = model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
            assert logits.shape == (1, len(model.classes)) and torch.isfinite(logits).all()
    return runs


def test_four_trainings_at_once_on_a_fresh_sqlite_store(tmp_path):
    """The default store, created by the four at once: no lock given up on, nothing lost, nothing shared."""
    train_four(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = check_four_runs(client, tmp_path, tmp_path / "downloads")
    for run in runs:  # artifacts next to the store
        assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    # one registered model, a version per run, the numbers 1-4 each given once
    versions = client.search_model_versions("name='cnnlab-resnet_small'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert {v.run_id for v in versions} == {run.info.run_id for run in runs}


LOG_DATA_AT = r"""
import sys, time
from pathlib import Path
from cnnlab import tracking
from cnnlab.data.cache import ImageCache
root, start = Path(sys.argv[1]), float(sys.argv[2])
run = tracking.mlflow_logger("race", None, str(root / "mlflow.db"), str(root / "mlartifacts"), trainer=False)
time.sleep(max(0.0, start - time.time()))
tracking.log_data(run, ImageCache(root / "shapes-0123456789ab"), "training")
run.finalize("FINISHED")
"""


def test_runs_recording_the_same_new_dataset_at_one_moment_each_record_it(tmp_path):
    """MLflow stores a dataset once per experiment: six runs storing a new one at the same instant race
    on its row (a UNIQUE constraint), as two trainings started together on new data do."""
    import numpy as np

    from cnnlab.data.cache import write_cache

    write_cache(tmp_path / "shapes-0123456789ab", {split: (np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64))
                                                  for split in ("train", "val", "test")}, {"classes": ["circle"]})
    start = time.time() + 8  # every process has imported MLflow and opened its run by then
    environment = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", LOG_DATA_AT, str(tmp_path), str(start)], cwd=ROOT,
                                  env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(6)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 6, [output[-2000:] for output in outputs]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 6
    assert all([(i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs] == [("shapes", "0123456789ab")]
               for run in runs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` as docs/sweeps.md starts it, on a free port, with two worker processes (two writers of
    its SQLite store; the default four only start slower on two cores) and without the job runner (GenAI
    scoring jobs, not tracking). Its access log is checked by the tests; stopped at the end."""
    folder = tmp_path_factory.mktemp("server")
    port, log = free_port(), folder / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2", "--backend-store-uri", f"sqlite:///{folder}/server.db",
             "--artifacts-destination", str(folder / "artifacts")],
            cwd=folder, env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", server, log)
        yield url, folder
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the worker processes it started
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def server_log(folder: Path, since: int = 0) -> str:
    """What the server has logged (from character ``since`` on)."""
    return (folder / "server.log").read_text()[since:]


def test_four_trainings_at_once_on_an_mlflow_server(tmp_path, mlflow_server):
    """The same through a real server, which stores the checkpoints itself."""
    url, server = mlflow_server
    start = len(server_log(server))
    train_four(tmp_path, f"tracking_uri={url}")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()  # all went to the server
    runs = check_four_runs(MlflowClient(url), tmp_path, tmp_path / "downloads")
    for run in runs:  # uploaded to the server, which wrote them into its artifact store
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert len(list((server / "artifacts").glob(f"*/{run.info.run_id}/artifacts/best/best.ckpt"))) == 1
    served = server_log(server, start)
    assert "log-batch" in served, served[-4000:]  # its access log is on: every request answered, none failed
    assert not TROUBLE.search(served) and not SERVER_ERROR.search(served), served[-4000:]


# Each process's first look-up of the experiment returns only once every process has looked: what happens when
# runs start at the same moment, every time (by chance, it happened to one start of four runs in three).
SAME_MOMENT = """
import pathlib, sys, time
from mlflow.tracking import MlflowClient

looked, job, jobs, url = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
look_up = MlflowClient.get_experiment_by_name

def once_all_have_looked(self, name):
    found = look_up(self, name)
    MlflowClient.get_experiment_by_name = look_up
    (looked / job).touch()
    deadline = time.time() + 120
    while len(list(looked.iterdir())) < jobs:
        assert time.time() < deadline, "the other processes never looked"
        time.sleep(0.01)
    return found

MlflowClient.get_experiment_by_name = once_all_have_looked
from cnnlab.tracking import mlflow_logger

logger = mlflow_logger(experiment_name="new", tracking_uri=url, default_db="unused.db", artifact_dir="unused",
                       run_name=f"job{job}")
logger.log_hyperparams({"job": job})
logger.finalize("success")
"""


def test_runs_starting_at_the_same_moment_on_a_server_share_its_new_experiment(tmp_path, mlflow_server):
    """Runs that open their MLflow logger on a server at the same moment, with an experiment the server does not
    have: one creates it, the others use it (Lightning's logger alone fails them: it already exists). Two runs
    (two processes importing Lightning: a few seconds) show it as four would."""
    url, server = mlflow_server
    start = len(server_log(server))
    (tmp_path / "looked").mkdir()
    jobs = 2
    logs = [tmp_path / f"job{job}.out" for job in range(jobs)]
    statuses = start_all([[sys.executable, "-c", SAME_MOMENT, str(tmp_path / "looked"), str(job), str(jobs), url]
                          for job in range(jobs)], logs, tmp_path)
    assert statuses == [0] * jobs, "\n".join(log.read_text()[-1500:] for log in logs)
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("new").experiment_id])
    assert sorted(run.data.params["job"] for run in runs) == [str(job) for job in range(jobs)]
    assert all(run.info.status == "FINISHED" for run in runs)
    assert not SERVER_ERROR.search(server_log(server, start))  # (three creations refused is the point: no 5xx)
