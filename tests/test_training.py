"""Real trainings through `python src/train.py`, read back from a real MLflow store."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.training.module import ImageClassifier
from conftest import run_script, tiny_overrides, wait_for_http

pytestmark = pytest.mark.slow


def only_run(client: MlflowClient, experiment: str = "cnnlab"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run into a fresh SQLite store."""
    root = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *tiny_overrides(root), "experiment=cnnlab")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result


def test_run_prints_accuracy_and_how_to_open_mlflow(trained):
    root, result = trained
    assert "Test accuracy: " in result.stdout
    assert f"ui --backend-store-uri sqlite:///{root.resolve()}/mlflow.db" in result.stdout
    output = result.stdout + result.stderr
    assert "Generating shapes" in output and "epoch 1/1: train acc " in output  # progress, also off a terminal
    (run_dir,) = (root / "outputs" / "runs").iterdir()
    log = (run_dir / "train.log").read_text()  # the run's story: what it is, each epoch, the result
    for line in ("Training resnet_small on shapes-", "resnet_small: 308,650 parameters", "epoch 1/1: train acc ",
                 "Test accuracy: ", "MLflow run "):
        assert line in log, line
    assert "litlogger" not in output and "LeafSpec" not in output and "FLOPs" not in output  # Lightning's noise


def test_checkpoints_best_and_last_are_in_the_hydra_run_folder(trained):
    root, _ = trained
    (run_dir,) = (root / "outputs" / "runs").iterdir()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    module = ImageClassifier.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu")
    assert module.classes[:2] == ["circle", "triangle"]
    assert module(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)


def test_run_records_its_data_as_an_mlflow_dataset_input(trained):
    """What the runs table's Dataset column shows: the prepared cache, read back from the store."""
    root, _ = trained
    run = only_run(MlflowClient(f"sqlite:///{root}/mlflow.db"))
    [cache] = (root / "data").glob("shapes-*")
    [used] = run.inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == ("shapes", cache.name.removeprefix("shapes-"))
    assert {tag.key: tag.value for tag in used.tags} == {"mlflow.data.context": "training"}
    assert json.loads(used.dataset.profile) == {"train": 64, "val": 32, "test": 32}
    assert json.loads(used.dataset.schema)["classes"] == json.loads((cache / "meta.json").read_text())["classes"]
    assert json.loads(used.dataset.source) == {"path": str(cache.resolve())}


def test_run_logs_params_metrics_artifacts_and_tags(trained):
    root, _ = trained
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = only_run(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["trainer.max_epochs"] == "1"
    assert params["data.source.train_size"] == "64"
    assert params["model.stages.1.out_chs"] == "64"
    assert params["optimizer._target_"] == "torch.optim.AdamW"
    assert int(params["params_total"]) == int(params["params_trainable"]) > 100_000
    assert run.data.metrics["params_trainable"] == int(params["params_trainable"])  # charted beside the accuracy
    for metric in ["train/loss", "train/acc", "train/f1", "train/acc_top5", "val/loss", "val/acc", "val/f1",
                   "val/acc_top5", "test/loss", "test/acc", "test/f1", "test/acc_top5"]:
        assert metric in run.data.metrics, metric
    assert 0 <= run.data.metrics["test/acc"] <= 1
    assert run.data.tags["mlflow.source.git.commit"]
    assert "trainer.max_epochs=1" in run.data.tags["cnnlab.command"]
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"config.yaml", "best/best.ckpt", "last/last.ckpt"} <= artifacts
    # the UI shows the experiment as model training (MLflow 3's tag), not as a GenAI app
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(root)))
    assert "max_epochs: 1" in config.read_text()
    # the learning rate once (its two param groups, with and without weight decay, share it), at the start
    assert [key for key in run.data.metrics if key.startswith("lr")] == ["lr"]
    assert run.data.metrics["lr"] == pytest.approx(float(run.data.params["optimizer.lr"]))
    assert str(root.resolve()) in run.info.artifact_uri  # artifacts next to the store, not in the cwd


def test_sweep_runs_one_tracked_job_per_value(tmp_path):
    result = run_script("train.py", "-m", *tiny_overrides(tmp_path), "seed=1,2", "logger=mlflow")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    commands = sorted(r.data.tags["cnnlab.command"] for r in runs)
    assert ["seed=1" in commands[0], "seed=2" in commands[1]] == [True, True]  # each job's own command
    assert all("-m" not in c.split() and "seed=1,2" not in c for c in commands)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "store")],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", server, log, timeout=90)
    except BaseException:
        server.kill()
        raise
    yield url, tmp_path
    server.terminate()
    server.wait(timeout=30)


def test_training_logs_to_an_mlflow_server_over_http(mlflow_server):
    url, tmp_path = mlflow_server
    result = run_script("train.py", *tiny_overrides(tmp_path / "project"), env={"MLFLOW_TRACKING_URI": url})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "project" / "mlflow.db").exists()  # nothing went to the local store
    assert f"{url}/#/experiments/" in result.stdout
    client = MlflowClient(url)
    run = only_run(client)
    assert run.data.params["trainer.max_epochs"] == "1"
    assert "test/acc" in run.data.metrics
    assert "best/best.ckpt" in artifact_paths(client, run.info.run_id)
    assert list((tmp_path / "store").rglob("best.ckpt"))  # stored by the server, not by the client


def test_a_checkpoint_from_elsewhere_starts_a_new_run_from_its_state(tmp_path):
    """resume=<a checkpoint outside a run's checkpoints/ folder>: a new folder, continuing the schedule (and the
    gradual unfreezing) from the checkpoint's epoch. (Resuming a run in place: tests/test_resume.py.)"""
    first = run_script("train.py", *tiny_overrides(tmp_path), "logger=none", "freeze=gradual", "freeze.unfreeze_at=[1]",
                       f"hydra.run.dir={tmp_path}/first")
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "first" / "checkpoints" / "last.ckpt").rename(tmp_path / "copied.ckpt")
    resumed = run_script("train.py", *tiny_overrides(tmp_path), "logger=none", "freeze=gradual", "freeze.unfreeze_at=[1]",
                         "trainer.max_epochs=2", f"resume={tmp_path}/copied.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "Restoring states from the checkpoint" in output and "unfroze stages.2" in output
    [folder] = (tmp_path / "outputs" / "runs").iterdir()
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2 * 64 // 16  # one more epoch, not two


def test_the_training_reports_its_test_split_as_an_evaluation_does(trained):
    """Per-image predictions, confusion matrix and per-class scores, in the run folder and the MLflow run; they
    agree with the test accuracy the training's test step measured (torchmetrics) and with scikit-learn."""
    from sklearn.metrics import confusion_matrix, f1_score

    root, _ = trained
    (run_dir,) = (root / "outputs" / "runs").iterdir()
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = only_run(client)
    assert {"test/predictions.csv", "test/confusion_matrix.csv", "test/confusion_matrix.png",
            "test/per_class.csv"} <= artifact_paths(client, run.info.run_id)
    rows = [line.split(",") for line in (run_dir / "test" / "predictions.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    label, predicted = header.index("label"), header.index("predicted")
    labels, predictions = [r[label] for r in rows], [r[predicted] for r in rows]
    assert len(rows) == 32
    assert sum(a == b for a, b in zip(labels, predictions)) / len(rows) == pytest.approx(run.data.metrics["test/acc"])
    classes = sorted(set(labels) | set(predictions))
    matrix = [line.split(",") for line in (run_dir / "test" / "confusion_matrix.csv").read_text().splitlines()]
    ours = {(r[0], c): int(v) for r in matrix[1:] for c, v in zip(matrix[0][1:], r[1:])}
    for (i, truth), (j, guess) in ((a, b) for a in enumerate(classes) for b in enumerate(classes)):
        assert ours.get((truth, guess), 0) == confusion_matrix(labels, predictions, labels=classes)[i, j]
    per_class = [line.split(",") for line in (run_dir / "test" / "per_class.csv").read_text().splitlines()]
    f1 = dict(zip(classes, f1_score(labels, predictions, labels=classes, average=None, zero_division=0)))
    column = per_class[0].index("f1")
    for row in per_class[1:]:
        if row[0] in f1:
            assert float(row[column]) == pytest.approx(f1[row[0]], abs=1e-4)
