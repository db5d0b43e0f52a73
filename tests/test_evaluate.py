"""`python src/evaluate.py` end to end: a tiny trained checkpoint, every output file, the MLflow store."""

import csv
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from hydra import compose, initialize_config_dir

from cnnlab.errors import ConfigError, one_line_errors
from cnnlab.evaluation.evaluate import evaluate as evaluate_checkpoint
from cnnlab.evaluation.evaluate import load_checkpoint
from conftest import CONF_DIR, run_script, tiny_overrides
from test_training import artifact_paths

OUTPUTS = {"metrics.json", "evaluation.json", "predictions.csv", "confusion_matrix.csv", "confusion_matrix.png",
           "per_class.csv"}
CLASSES = ["circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "arrow"]


def evaluate(root, run_dir, *args):
    result = run_script("evaluate.py", *tiny_overrides(root), f"hydra.run.dir={run_dir}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run (its checkpoint, test metrics and MLflow run id), then a ten_crop evaluation of it."""
    root = tmp_path_factory.mktemp("evaluate")
    result = run_script("train.py", *tiny_overrides(root))
    assert result.returncode == 0, result.stderr[-3000:]
    (train_dir,) = (root / "outputs" / "runs").iterdir()
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    (train_run,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    checkpoint = train_dir / "checkpoints" / "best.ckpt"
    evaluation = evaluate(root, root / "ten_crop", f"ckpt={checkpoint}", "tta=ten_crop")
    return root, checkpoint, json.loads((train_dir / "metrics.json").read_text()), train_run.info.run_id, evaluation


def read_csv(path):
    with open(path) as file:
        return list(csv.reader(file))


@pytest.mark.slow
def test_ten_crop_writes_every_output_with_the_plain_baseline(trained):
    root, checkpoint, train_metrics, train_run_id, result = trained
    out = root / "ten_crop"
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    assert "Test accuracy: none " in result.stdout and ", ten_crop " in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"none", "ten_crop"}
    assert all(set(m) == {"acc", "acc_top5", "f1", "loss"} for m in metrics.values())
    # the plain view is exactly what Lightning's test step scored for the same checkpoint
    assert metrics["none"]["acc"] == pytest.approx(train_metrics["test/acc"], abs=1e-6)
    assert metrics["none"]["loss"] == pytest.approx(train_metrics["test/loss"], abs=1e-4)
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["checkpoint"] == str(checkpoint.resolve())
    assert summary["train_run_id"] == train_run_id
    assert summary["tta"] == "ten_crop" and summary["classes"] == CLASSES
    assert summary["mlflow_run_id"] and summary["mlflow_run_id"] != train_run_id


@pytest.mark.slow
def test_predictions_are_distributions_that_give_the_reported_scores(trained):
    root, *_ = trained
    out = root / "ten_crop"
    header, *rows = read_csv(out / "predictions.csv")
    assert header == ["index", "label", "predicted", *CLASSES]
    assert [int(r[0]) for r in rows] == list(range(32))
    (cache,) = (root / "data").glob("shapes-*")
    assert [r[1] for r in rows] == [CLASSES[i] for i in np.load(cache / "test_labels.npy")]  # the test split, in order
    probabilities = np.array([r[3:] for r in rows], float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-4)
    assert [r[2] for r in rows] == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    metrics = json.loads((out / "metrics.json").read_text())["ten_crop"]
    assert np.mean([r[1] == r[2] for r in rows]) == pytest.approx(metrics["acc"], abs=1e-6)

    _, *matrix = read_csv(out / "confusion_matrix.csv")
    counts = np.array([r[1:] for r in matrix], int)
    assert [r[0] for r in matrix] == CLASSES and counts.sum() == 32
    assert np.trace(counts) / 32 == pytest.approx(metrics["acc"], abs=1e-6)
    per_class = {r["class"]: r for r in csv.DictReader(open(out / "per_class.csv"))}
    assert [int(per_class[c]["support"]) for c in CLASSES] == counts.sum(axis=1).tolist()
    assert np.mean([float(per_class[c]["f1"]) for c in CLASSES]) == pytest.approx(metrics["f1"], abs=1e-5)


@pytest.mark.slow
def test_the_evaluation_is_one_mlflow_run_next_to_the_training_run(trained):
    root, _, _, train_run_id, _ = trained
    summary = json.loads((root / "ten_crop" / "evaluation.json").read_text())
    metrics = json.loads((root / "ten_crop" / "metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_run(train_run_id).info.experiment_id
    assert run.data.tags["cnnlab.stage"] == "evaluate"
    assert run.data.tags["cnnlab.train_run_id"] == train_run_id
    assert "src/evaluate.py" in run.data.tags["cnnlab.command"] and "tta=ten_crop" in run.data.tags["cnnlab.command"]
    for mode, values in metrics.items():
        for name, value in values.items():
            assert run.data.metrics[f"test/{mode}/{name}"] == pytest.approx(value)
    assert run.data.params["tta.crops"] == "5" and run.data.params["views"] == "10"
    assert OUTPUTS | {"config.yaml"} <= artifact_paths(client, run.info.run_id)
    assert str(root.resolve()) in run.info.artifact_uri  # next to the store, like the training run's


@pytest.mark.slow
def test_a_runs_reference_evaluates_that_runs_best_checkpoint_untracked(trained):
    root, _, _, train_run_id, _ = trained
    result = evaluate(root, root / "flip", f"ckpt=runs:/{train_run_id}", "tta=flip", "logger=none")
    assert "MLflow run" not in result.stdout
    summary = json.loads((root / "flip" / "evaluation.json").read_text())
    assert summary["checkpoint"] == f"runs:/{train_run_id}"
    assert summary["train_run_id"] == train_run_id and summary["mlflow_run_id"] is None
    metrics = json.loads((root / "flip" / "metrics.json").read_text())
    ten_crop = json.loads((root / "ten_crop" / "metrics.json").read_text())
    assert set(metrics) == {"none", "flip"}
    assert metrics["none"] == pytest.approx(ten_crop["none"])  # the same checkpoint: best.ckpt
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert "evaluate-flip" not in {r.info.run_name for r in runs}


@pytest.mark.slow
def test_a_checkpoint_of_other_classes_is_refused_in_one_line(trained):
    root, checkpoint, *_ = trained
    result = run_script("evaluate.py", *tiny_overrides(root), f"hydra.run.dir={root / 'refused'}",
                        f"ckpt={checkpoint}", "data.source.classes=[circle,square,star]")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("Error: the checkpoint's classes ['circle', 'triangle'")
    assert "differ from the data's ['circle', 'square', 'star']" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.root_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit:
        one_line_errors(evaluate_checkpoint)(cfg)  # what src/evaluate.py runs
    assert exit.value.code == 2
    assert capsys.readouterr().err == "Error: Missing mandatory value: ckpt (give it on the command line: ckpt=...)\n"


def test_a_checkpoint_that_is_not_there_or_not_a_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint 'no/such.ckpt' not found"):
        load_checkpoint("no/such.ckpt")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=f"cannot read {tmp_path / 'notes.ckpt'} as a checkpoint"):
        load_checkpoint(str(tmp_path / "notes.ckpt"))
