"""pipelines/freeze_vs_data: tiny, end to end; its crossing points and verdicts against hand-computed cases
(its nested training sets: test_subsets.py)."""

import math

import pytest
import torch
import yaml

from cnnlab import create_model
from cnnlab.studies.freeze_vs_data import HEAD, claims, crossings, noise_margin, trainable_parameters
from conftest import ROOT
from study_runs import check_study, claims as claim_rows, run_study

TINY = {"data": {"source": {"name": "shapes", "image_size": 32, "train_size": 40, "val_size": 20, "test_size": 20},
                 "target": {"name": "shapes_fewshot", "image_size": 32, "train_size": 12, "val_size": 12,
                            "test_size": 12}},
        "pretrain": {"epochs": 1, "lr": 0.002}, "steps": 1,
        "trials": {f"{mode}_{n}": {"freeze": mode, "depth": depth, "per_class": n, "epochs": 1, "lr": 0.001}
                   for n in (1, 2) for mode, depth in ((HEAD, "null"), ("none", 0))}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_study(tmp_path_factory.mktemp("study"), "freeze_vs_data", TINY)


@pytest.mark.slow
def test_the_study_runs_and_summarises(study):
    check_study(study, expected_claims=2)
    assert claim_rows(study.summary)[0][0].startswith("With a small training set")
    assert {f"{mode}_{n}_acc" for mode in (HEAD, "none") for n in (1, 2)} <= set(study.metrics)
    # the trials trained on 1 and 2 images of each of the 6 classes, and were tested on the same 12 images
    logs = {key: (study.folder / f"results/trials/{key}/train.log").read_text() for key in TINY["trials"]}
    assert all("train 6, val 12, test 12 images" in logs[key] for key in logs if key.endswith("_1"))
    assert all("train 12, val 12, test 12 images" in logs[key] for key in logs if key.endswith("_2"))
    assert "| none (" in study.summary and f"| {HEAD} (774 trainable)" in study.summary  # 128 x 6 + 6


# Where the curves cross: differences linear in log(size), hand-computed.

def test_a_symmetric_crossing_is_at_the_geometric_mean():
    assert crossings([10, 100], [0.5, 0.5], [0.4, 0.6]) == [(pytest.approx(math.sqrt(1000)), 1)]


def test_a_crossing_three_quarters_of_the_way_on_the_log_axis():
    # differences -0.3 then +0.1: zero at 3/4 of the way from log 10 to log 1000, 10 ** 2.5
    assert crossings([10, 1000], [0.7, 0.7], [0.4, 0.8]) == [(pytest.approx(10 ** 2.5), 1)]


def test_a_crossing_between_the_middle_sizes_of_four():
    first, second = [0.60, 0.70, 0.80, 0.85], [0.50, 0.66, 0.84, 0.90]   # differences -.10 -.04 +.04 +.05
    assert crossings([5, 10, 20, 50], first, second) == [(pytest.approx(math.sqrt(200)), 1)]


def test_falling_behind_and_crossing_twice():
    found = crossings([1, 10, 100], [0.5, 0.5, 0.5], [0.6, 0.4, 0.6])
    assert found == [(pytest.approx(math.sqrt(10)), -1), (pytest.approx(math.sqrt(1000)), 1)]


def test_ties_at_measured_sizes():
    assert crossings([5, 10, 20], [0, 0, 0], [-1, 0, 1]) == [(pytest.approx(10), 1)]       # crosses at the tie
    assert crossings([5, 10, 20, 50], [0] * 4, [-1, 0, 0, 1]) == [(pytest.approx(math.sqrt(200)), 1)]
    assert crossings([5, 10, 20], [0, 0, 0], [1, 0, 1]) == []                               # a touch
    assert crossings([5, 10, 20], [0, 0, 0], [0, 0, 0]) == []


def test_no_crossing_when_one_curve_stays_above():
    assert crossings([5, 10, 20, 50], [0.5, 0.6, 0.7, 0.8], [0.4, 0.5, 0.55, 0.79]) == []


# The epochs, the trainable parameters and the noise margin.

def test_the_default_trials_take_the_same_number_of_steps():
    params = yaml.safe_load((ROOT / "pipelines/freeze_vs_data/params.yaml").read_text())
    classes = len(yaml.safe_load((ROOT / "conf/data/shapes_fewshot.yaml").read_text())["source"]["classes"])
    for key, trial in params["trials"].items():
        batches = math.ceil(trial["per_class"] * classes / params["batch_size"])
        assert trial["epochs"] == math.ceil(params["steps"] / batches), key
        assert trial["per_class"] * classes <= params["data"]["target"]["train_size"], key


def test_only_the_softmax_layer_trains_under_all_but_head():
    with torch.device("meta"):
        net = create_model("resnet_small", num_classes=6)
    total = sum(p.numel() for p in net.parameters())
    assert trainable_parameters(net, None) == 128 * 6 + 6      # 128 features in, 6 classes out, with biases
    assert trainable_parameters(net, 0) == total
    assert total > trainable_parameters(net, 1) > trainable_parameters(net, 2) > 128 * 6 + 6


def test_the_noise_margin_is_two_standard_errors_of_a_difference():
    assert noise_margin([0.4, 0.6], 200) == pytest.approx(2 * math.sqrt(2 * 0.25 / 200))   # 0.1


# The verdicts, from hand-made curves (sizes 5 and 50, margin 2 points).

MODES = [HEAD, "stages2", "none"]


def verdicts(acc: dict) -> list[str]:
    crossed = {(a, b): crossings([5, 50], acc[a], acc[b]) for i, a in enumerate(MODES) for b in MODES[i + 1:]}
    return [claim.verdict for claim in claims(MODES, [5, 50], acc, crossed, 0.02)]


def test_the_notes_advice_confirmed():
    acc = {HEAD: [0.70, 0.80], "stages2": [0.65, 0.85], "none": [0.55, 0.90]}
    assert verdicts(acc) == ["confirmed", "confirmed"]


def test_the_notes_advice_refuted():
    # training everything wins with little data, and its lead melts with more
    acc = {HEAD: [0.50, 0.85], "stages2": [0.60, 0.84], "none": [0.70, 0.80]}
    assert verdicts(acc) == ["refuted", "refuted"]


def test_a_lead_that_grows_but_stays_behind_leaves_the_switch_unseen():
    acc = {HEAD: [0.70, 0.80], "stages2": [0.50, 0.74], "none": [0.30, 0.60]}
    assert verdicts(acc) == ["confirmed", "not reproduced at this budget"]


def test_differences_within_the_margin_decide_nothing():
    acc = {HEAD: [0.70, 0.80], "stages2": [0.69, 0.81], "none": [0.69, 0.81]}
    assert verdicts(acc) == ["not reproduced at this budget", "not reproduced at this budget"]
