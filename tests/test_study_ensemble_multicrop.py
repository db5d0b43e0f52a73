"""pipelines/ensemble_multicrop: tiny, end to end; its arithmetic against numpy and closed forms; and the
shapes generator's placement options, which must leave every existing setting's bytes as they were."""

import csv
import hashlib
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from cnnlab.data.shapes import generate_split
from cnnlab.data.sources import ShapesSource
from cnnlab.errors import ConfigError
from cnnlab.studies.ensemble_multicrop import names, paired, read_task, verdict, view_count
from study_runs import check_study, claims, run_study

MODES = ["none", "ten_crop"]  # the two the summary needs (plain and multi-crop); test_tta.py has every mode's views
TINY = {"tasks": "shapes_centred",  # one task: the second doubles every sweep, and is the same code
        "data": "data.source.train_size=40 data.source.val_size=20 data.source.test_size=30", "epochs": 1,
        "modes": ",".join(MODES),
        "members": {"m1": {"model": "resnet_small", "width": 0.25, "depth": 1, "seed": 1},
                    "m2": {"model": "resnet_small", "width": 0.25, "depth": 1, "seed": 2}},
        "ensembles": {"first_2": "{m1: results/evaluate/m1/${views}, m2: results/evaluate/m2/${views}}"}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_study(tmp_path_factory.mktemp("study"), "ensemble_multicrop", TINY)


def probabilities(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """A predictions.csv's probabilities (images, classes) and true class indices, read with csv and numpy."""
    with open(folder / "predictions.csv", newline="") as file:
        header, *rows = list(csv.reader(file))
    classes = header[3:]
    return (np.array([[float(v) for v in row[3:]] for row in rows]),
            np.array([classes.index(row[1]) for row in rows]))


@pytest.mark.slow
def test_the_study_runs_and_summarises(study):
    check_study(study, expected_claims=2)  # ensembling, and multi-crop on the one task
    found = claims(study.summary)
    assert found[0][0].startswith("Ensembling") and all(c.startswith("Multi-crop") for c, _, _ in found[1:])
    folder = study.folder / "results"
    for task in names(TINY["tasks"]):
        for mode in MODES:
            # the ensemble's accuracy, recomputed from its members' saved probabilities with numpy alone
            p1, labels = probabilities(folder / "evaluate/m1" / task / mode)
            p2, labels2 = probabilities(folder / "evaluate/m2" / task / mode)
            assert (labels == labels2).all() and len(labels) == 30
            expected = float(((p1 + p2) / 2).argmax(1).__eq__(labels).mean())
            written = json.loads((folder / "ensemble/first_2" / task / mode / "metrics.json").read_text())
            assert written["ensemble"]["acc"] == pytest.approx(expected)
            assert study.metrics[f"{task}_{mode}_first_2_acc"] == pytest.approx(expected)
            singles = [float(p.argmax(1).__eq__(labels).mean()) for p in (p1, p2)]
            assert study.metrics[f"{task}_{mode}_member_mean_acc"] == pytest.approx(sum(singles) / 2)
    client, runs = study.runs()
    evaluations = [r for r in runs if r.data.tags.get("cnnlab.stage") == "evaluate"]
    assert len(evaluations) == len(TINY["members"]) * len(names(TINY["tasks"])) * len(MODES)  # each its own run


def test_paired_differences_are_a_mean_and_its_standard_error():
    differences = [0.02, 0.01, 0.03, -0.01, 0.02]
    mean, error = paired(differences)
    assert mean == pytest.approx(statistics.mean(differences))
    assert error == pytest.approx(statistics.stdev(differences) / len(differences) ** 0.5)
    assert paired([0.5]) == (0.5, 0.0)


@pytest.mark.parametrize(("differences", "expected"), [
    ([0.02, 0.03, 0.025, 0.02], "confirmed"),
    ([-0.02, -0.03, -0.025, -0.02], "refuted"),
    ([0.05, -0.04, 0.01, -0.02], "not reproduced at this budget"),
])
def test_a_verdict_is_twice_the_standard_error_from_zero(differences, expected):
    assert verdict(differences) == expected


@pytest.mark.parametrize(("mode", "views"), [("none", 1), ("flip", 2), ("five_crop", 5), ("ten_crop", 10)])
def test_the_modes_have_the_classic_numbers_of_views(mode, views):
    assert view_count(mode, 32) == views


def write_scores(folder: Path, scores: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(scores))


def test_an_ensemble_other_than_the_first_k_members_is_refused(tmp_path):
    members = ["m1", "m2", "m3"]
    for member in members:
        write_scores(tmp_path / "evaluate" / member / "t" / "none", {"none": {"acc": 0.5}})
    write_scores(tmp_path / "ensemble/first_2/t/none", {"m1": {"acc": 0.5}, "m2": {"acc": 0.5}, "ensemble": {"acc": 0.6}})
    write_scores(tmp_path / "ensemble/first_3/t/none", {"m1": {}, "m2": {}, "m3": {}, "ensemble": {"acc": 0.7}})
    task = read_task(tmp_path, "t", "a task", ["none"], members)
    assert task.curve("none") == [0.5, 0.6, 0.7]
    write_scores(tmp_path / "ensemble/first_2/t/none", {"m1": {}, "m3": {}, "ensemble": {"acc": 0.6}})
    with pytest.raises(ConfigError, match="not the first 2 members"):
        read_task(tmp_path, "t", "a task", ["none"], members)


# ---- the generator's placement options (src/cnnlab/data/shapes.py, sources.py) ----------------------------

BASE = ["circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "arrow"]
FEWSHOT = ["octagon", "diamond", "semicircle", "heart", "tee", "chevron"]


@pytest.mark.parametrize(("classes", "size", "seed", "count", "digest"), [
    # computed with the generator before radius/max_offset existed (commit 74ac602), on this project's machine
    (BASE, 32, 0, 300, "7d867fc82d93ef71589aad37b7222efea0e544cc798895845b7c05ec7e3494af"),
    (FEWSHOT, 32, 1001, 120, "11cd91fe174ca858a56e19afd49257c2769a6866cff3f0cff59ed07053789ad3"),
    (BASE, 64, 2, 50, "127558fd42595bf8f33f5799fbdc5e28da8b16483f0b88c3f20be8832f30511b"),
])
def test_the_default_placement_generates_the_bytes_it_always_did(classes, size, seed, count, digest):
    images, labels = generate_split(count, classes, size, seed)
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == digest


def test_the_default_placement_keeps_every_cache_name(tmp_path):
    # the folder names of the shapes and shapes_fewshot defaults before these options existed
    assert ShapesSource(tmp_path, BASE).cache_dir.name == "shapes-888eee0c6715"
    assert ShapesSource(tmp_path, BASE, radius=[0.24, 0.42], max_offset=None).cache_dir.name == "shapes-888eee0c6715"
    fewshot = ShapesSource(tmp_path, FEWSHOT, train_size=120, val_size=60, test_size=600, seed=1)
    assert fewshot.cache_dir.name == "shapes-d51c31c2ef28"
    assert ShapesSource(tmp_path, BASE, radius=[0.3, 0.4], max_offset=0.05).cache_dir.name != "shapes-888eee0c6715"


def test_centred_shapes_sit_at_the_centre():
    """On a uniform background... there is none; so compare each pixel with its image's border instead: the
    shape's pixels (far from the border's colours) of centred shapes gather around the image's centre."""
    def centre_of_mass(images):
        border = np.concatenate([images[:, :2].reshape(len(images), -1, 3), images[:, -2:].reshape(len(images), -1, 3)], 1)
        distance = np.abs(images.astype(float) - np.median(border, 1)[:, None, None]).sum(-1)
        weights = distance > 120  # the shape stands out from its background by a clear luminance step
        ys, xs = np.mgrid[0:images.shape[1], 0:images.shape[2]]
        return np.array([[(w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()] for w in weights if w.sum()])

    centred, _ = generate_split(60, BASE, 32, seed=3, radius_range=(0.3, 0.4), max_offset=0.0)
    anywhere, _ = generate_split(60, BASE, 32, seed=3)
    off_centre = lambda images: np.abs(centre_of_mass(images) - 15.5).mean()
    assert off_centre(centred) < 2 < off_centre(anywhere)


@pytest.mark.parametrize(("radius", "max_offset"), [((0.0, 0.3), None), ((0.4, 0.3), None), ((0.3, 0.6), None),
                                                     ((0.3, 0.4), -0.1), ((0.3, 0.4), 0.7)])
def test_a_placement_out_of_range_is_refused(tmp_path, radius, max_offset):
    with pytest.raises(ConfigError):
        ShapesSource(tmp_path, BASE, radius=radius, max_offset=max_offset)


def test_the_centred_data_option_composes(compose):
    source = compose("data=shapes_centred").data.source
    assert list(source.radius) == [0.3, 0.4] and source.max_offset == 0.05 and list(source.classes) == BASE
