"""src/ensemble.py: output averaging of evaluation folders, checked on hand-made predictions."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.errors import ConfigError
from cnnlab.evaluation.ensemble import (ENSEMBLE, average, check_compatible, metrics, normalised_weights,
                                        read_member)
from conftest import run_script

CLASSES = ["circle", "square", "star", "ring", "cross"]


def write_member(folder: Path, probabilities, labels, classes=CLASSES, index=None, evaluation=None) -> Path:
    """An evaluation folder as src/evaluate.py writes it: predictions.csv and, if given, evaluation.json."""
    folder.mkdir(parents=True, exist_ok=True)
    probabilities = np.asarray(probabilities, dtype=float)
    index = range(len(labels)) if index is None else index
    with open(folder / "predictions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["index", "label", "predicted", *classes])
        for i, label, row in zip(index, labels, probabilities):
            writer.writerow([i, classes[label], classes[int(row.argmax())], *(repr(float(p)) for p in row)])
    if evaluation is not None:
        (folder / "evaluation.json").write_text(json.dumps({"checkpoint": "best.ckpt", "tta": "none",
                                                            "classes": list(classes), **evaluation}))
    return folder


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def complementary_members(num_classes: int = 5) -> tuple[list[np.ndarray], list[int]]:
    """Three members, each confidently right on every image but one, where it is mildly wrong (a
    different image for each): each scores (n-1)/n, their mean is right everywhere."""
    labels = list(range(num_classes))
    members = []
    for wrong in range(3):
        p = np.zeros((num_classes, num_classes))
        for image, label in enumerate(labels):
            if image == wrong:  # 0.3 on the truth, 0.45 on the next class
                p[image] = 0.25 / (num_classes - 2)
                p[image, label], p[image, (label + 1) % num_classes] = 0.3, 0.45
            else:
                p[image] = 0.4 / (num_classes - 1)
                p[image, label] = 0.6
        members.append(p)
    return members, labels


def test_mean_weighted_mean_and_logit_averaging(tmp_path):
    rng = np.random.default_rng(0)
    labels = [0, 1, 2, 3, 4, 0, 2]
    logits = [rng.normal(size=(7, 5)) * 2 for _ in range(3)]
    folders = [write_member(tmp_path / name, softmax(z), labels) for name, z in zip("abc", logits)]
    members = [read_member(name, folder) for name, folder in zip("abc", folders)]
    check_compatible(members)
    p = [softmax(z) for z in logits]
    tensors = [m.probabilities for m in members]

    mean = average(tensors, normalised_weights("abc", None))
    np.testing.assert_allclose(mean.numpy(), (p[0] + p[1] + p[2]) / 3, atol=1e-12)

    w = normalised_weights("abc", {"a": 3, "b": 1, "c": 0})
    assert w == [0.75, 0.25, 0.0]
    np.testing.assert_allclose(average(tensors, w).numpy(), 0.75 * p[0] + 0.25 * p[1], atol=1e-12)

    # logits: exactly the softmax of the averaged logits, though only probabilities were written;
    # the same as the normalised (weighted) geometric mean of the probabilities
    geometric = average(tensors, w, "logits").numpy()
    np.testing.assert_allclose(geometric, softmax(0.75 * logits[0] + 0.25 * logits[1]), atol=1e-12)
    product = p[0] ** 0.75 * p[1] ** 0.25
    np.testing.assert_allclose(geometric, product / product.sum(axis=1, keepdims=True), atol=1e-12)
    assert not np.allclose(geometric, average(tensors, w).numpy(), atol=1e-3)  # two different ensembles


def test_a_member_probability_of_zero_does_not_veto_a_class_in_logit_averaging():
    confident = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # a float32 softmax that underflowed
    other = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    result = average([confident, other], [0.5, 0.5], "logits")
    assert torch.isfinite(result).all() and torch.allclose(result, torch.tensor([[0.5, 0.5]], dtype=torch.float64))


def test_the_ensemble_beats_each_member(tmp_path):
    probabilities, labels = complementary_members()
    members = [read_member(name, write_member(tmp_path / name, p, labels)) for name, p in zip("abc", probabilities)]
    targets = members[0].targets
    for member in members:
        assert metrics(member.probabilities, targets)["acc"] == pytest.approx(0.8)
    for method in ("probabilities", "logits"):
        ensemble = average([m.probabilities for m in members], [1 / 3] * 3, method)
        scores = metrics(ensemble, targets)
        assert scores["acc"] == 1.0 and scores["f1"] == 1.0 and scores["acc_top5"] == 1.0
        expected_loss = -np.mean(np.log(ensemble.numpy()[range(5), labels]))
        assert scores["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert scores["loss"] < min(metrics(m.probabilities, targets)["loss"] for m in members)
    assert np.mean([0.3, 0.6, 0.6]) == pytest.approx(average([m.probabilities for m in members], [1 / 3] * 3)[0, 0])


def test_fewer_than_five_classes_have_no_top5():
    assert set(metrics(torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([0]))) == {"acc", "f1", "loss"}


@pytest.fixture
def pair(tmp_path):
    probabilities, labels = complementary_members()
    return tmp_path, probabilities, labels, write_member(tmp_path / "a", probabilities[0], labels)


def test_refuses_members_with_other_classes(pair):
    tmp_path, probabilities, labels, a = pair
    reordered = write_member(tmp_path / "b", probabilities[1], labels, classes=CLASSES[::-1])
    with pytest.raises(ConfigError, match=r"member 'b' .*classes differ from member 'a''s \(class 0: 'cross' vs 'circle'"):
        check_compatible([read_member("a", a), read_member("b", reordered)])
    fewer = write_member(tmp_path / "c", probabilities[1][:, :4] / probabilities[1][:, :4].sum(1, keepdims=True),
                         [label % 4 for label in labels], classes=CLASSES[:4])
    with pytest.raises(ConfigError, match=r"member 'c' .*classes differ .*\(4 vs 5 classes\)"):
        check_compatible([read_member("a", a), read_member("c", fewer)])


def test_refuses_members_tested_on_other_images(pair):
    tmp_path, probabilities, labels, a = pair
    shorter = write_member(tmp_path / "b", probabilities[1][:4], labels[:4])
    with pytest.raises(ConfigError, match=r"member 'b' .*test set differs from member 'a''s \(4 vs 5 images\)"):
        check_compatible([read_member("a", a), read_member("b", shorter)])
    relabelled = write_member(tmp_path / "c", probabilities[1], [0, 1, 3, 3, 4])
    with pytest.raises(ConfigError, match=r"member 'c' .*test set differs .*line 4: image 2 labelled 'ring' "
                                          r"vs image 2 labelled 'star'"):
        check_compatible([read_member("a", a), read_member("c", relabelled)])
    shifted = write_member(tmp_path / "d", probabilities[1], labels, index=[10, 11, 12, 13, 14])
    with pytest.raises(ConfigError, match=r"member 'd' .*test set differs .*image 10 labelled 'circle' vs image 0"):
        check_compatible([read_member("a", a), read_member("d", shifted)])


def test_refuses_missing_files_and_rows_that_are_not_probabilities(pair):
    tmp_path, probabilities, labels, a = pair
    with pytest.raises(ConfigError, match=r"member 'x' \(.*nowhere\): no such folder"):
        read_member("x", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"member 'e' .*: no predictions.csv in it"):
        read_member("e", tmp_path / "empty")
    logits = write_member(tmp_path / "logits", np.log(probabilities[0]), labels)
    with pytest.raises(ConfigError, match=r"member 'l' .*line 2 is not a row of probabilities"):
        read_member("l", logits)
    unnormalised = write_member(tmp_path / "half", probabilities[0] / 2, labels)
    with pytest.raises(ConfigError, match=r"line 2 .*sum to 0\.5"):
        read_member("h", unnormalised)
    other = write_member(tmp_path / "json", probabilities[0], labels, evaluation={"classes": CLASSES[::-1]})
    with pytest.raises(ConfigError, match=r"member 'j' .*evaluation.json lists other classes"):
        read_member("j", other)
    with pytest.raises(ConfigError, match="use letters, digits"):
        read_member(ENSEMBLE, a)


def test_weights_name_each_member_with_a_number_at_least_zero():
    assert normalised_weights(["a", "b"], None) == [0.5, 0.5]
    assert normalised_weights(["a", "b"], {"a": 1, "b": 3}) == [0.25, 0.75]
    for weights, message in [({"a": 1}, "no weight for b"), ({"a": 1, "b": 1, "c": 1}, "no member named c"),
                             ({"a": 1, "b": -1}, r"weights.b=-1: a weight is a number >= 0"),
                             ({"a": 1, "b": "x"}, "a weight is a number"), ({"a": 0, "b": 0}, "all 0")]:
        with pytest.raises(ConfigError, match=message):
            normalised_weights(["a", "b"], weights)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def artifact_paths(client: MlflowClient, run_id: str) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id)}


def test_ensemble_script_writes_the_comparison_and_tracks_it(tmp_path):
    probabilities, labels = complementary_members()
    members = {name: write_member(tmp_path / "evaluations" / name, p, labels,
                                  evaluation={"mlflow_run_id": f"eval-{name}", "train_run_id": f"train-{name}"})
               for name, p in zip(["seed1", "seed2", "mnv2"], probabilities)}
    (members["mnv2"] / "evaluation.json").unlink()  # evaluation.json is optional
    listing = ", ".join(f"{name}: {folder}" for name, folder in members.items())
    result = run_script("ensemble.py", f"paths.root_dir={tmp_path}", f"members={{{listing}}}",
                        "weights={seed1: 2, seed2: 1, mnv2: 1}")
    assert result.returncode == 0, result.stderr[-3000:]
    out, = (tmp_path / "outputs" / "ensemble").iterdir()

    expected = average([torch.tensor(p) for p in probabilities], [0.5, 0.25, 0.25])
    results = json.loads((out / "metrics.json").read_text())
    assert list(results) == ["seed1", "seed2", "mnv2", ENSEMBLE]
    assert all(results[name]["acc"] == pytest.approx(0.8) for name in members)
    assert results[ENSEMBLE]["acc"] == 1.0 and set(results[ENSEMBLE]) == {"acc", "acc_top5", "f1", "loss"}
    assert results[ENSEMBLE]["loss"] == pytest.approx(-np.log(expected.numpy()[range(5), labels]).mean(), rel=1e-5)

    table = (out / "members.md").read_text()
    assert "+20.00 points over the best member, seed1 (0.8000)" in table and "weighted mean of the probabilities" in table
    assert "| seed1 | 0.500 | 0.8000 |" in table and "| **ensemble** |  | **1.0000** |" in table
    assert "| ensemble - best member |  | +0.2000 |" in table
    rows = read_csv(out / "members.csv")
    assert [row["member"] for row in rows] == [*members, ENSEMBLE]
    assert float(rows[0]["weight"]) == 0.5 and float(rows[-1]["acc"]) == 1.0
    assert rows[0]["folder"] == str(members["seed1"])
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ensemble - best member" in result.stdout and f"Wrote {out}" in result.stdout

    # the ensemble's predictions are a member's: the same columns, and readable as one
    again = read_member("again", out)
    assert again.labels == tuple(CLASSES[label] for label in labels)
    np.testing.assert_allclose(again.probabilities.numpy(), expected.numpy(), atol=1e-6)
    assert [row["predicted"] for row in read_csv(out / "predictions.csv")] == CLASSES

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run, = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "ensemble"
    tags = run.data.tags
    assert tags["cnnlab.stage"] == "ensemble" and tags["cnnlab.command"].startswith("python src/ensemble.py")
    assert tags["cnnlab.member.seed1.run_id"] == "eval-seed1" and tags["cnnlab.member.seed2.train_run_id"] == "train-seed2"
    assert not any(key.startswith("cnnlab.member.mnv2") for key in tags)
    assert run.data.metrics["test/ensemble/acc"] == 1.0
    assert run.data.metrics["test/seed2/acc"] == pytest.approx(0.8)
    assert run.data.metrics["test/mnv2/loss"] == pytest.approx(results["mnv2"]["loss"])
    assert run.data.params["weights.seed1"] == "0.5" and run.data.params["average"] == "probabilities"
    assert artifact_paths(client, run.info.run_id) == {"metrics.json", "members.md", "members.csv", "accuracy.png",
                                                       "predictions.csv"}
    assert str(tmp_path.resolve()) in run.info.artifact_uri  # next to the store, as training's


def test_one_member_is_allowed_with_a_warning_and_logger_none_tracks_nothing(tmp_path):
    probabilities, labels = complementary_members()
    folder = write_member(tmp_path / "a", probabilities[0], labels)
    result = run_script("ensemble.py", f"paths.root_dir={tmp_path}", f"+members.only={folder}", "logger=none",
                        "average=logits")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "an ensemble of one member is that member" in result.stdout + result.stderr
    out, = (tmp_path / "outputs" / "ensemble").iterdir()
    results = json.loads((out / "metrics.json").read_text())
    assert results["only"] == pytest.approx(results[ENSEMBLE])
    assert not (tmp_path / "mlflow.db").exists()


def test_ensemble_script_errors_are_one_line(tmp_path):
    probabilities, labels = complementary_members()
    a = write_member(tmp_path / "a", probabilities[0], labels)
    b = write_member(tmp_path / "b", probabilities[1], labels, classes=CLASSES[::-1])
    result = run_script("ensemble.py", f"paths.root_dir={tmp_path}", f"members={{a: {a}, b: {b}}}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: member 'b' ({b}): its classes differ from member 'a''s (class 0: 'cross' vs 'circle'); "
        "an ensemble needs models of the same classes in the same order"]
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was tracked
    result = run_script("ensemble.py", f"paths.root_dir={tmp_path}")
    assert result.returncode == 2 and "members=..." in result.stderr
