"""pipelines/augmentation: tiny, end to end; each trial's composed config holds what its key says; and the
verdict rules on results made up here, against numpy's arithmetic."""

import shlex
from functools import cache

import numpy as np
import pytest
import yaml

from cnnlab.studies.augmentation import measure
from cnnlab.studies.summary import Trial
from conftest import ROOT
from study_runs import check_study, claims, run_study

STUDY = ROOT / "pipelines" / "augmentation"
PARAMS = yaml.safe_load((STUDY / "params.yaml").read_text())
POLICIES = ("none", "light", "standard", "heavy")

TINY = {"data": "data=shapes data.source.train_size=40 data.source.val_size=20 data.source.test_size=20", "epochs": 1,
        "trials": {"none": PARAMS["trials"]["none"], "crop": PARAMS["trials"]["crop"]}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_study(tmp_path_factory.mktemp("study"), "augmentation", TINY)


@pytest.mark.slow
def test_the_study_runs_and_summarises(study):
    check_study(study, expected_claims=1)   # no policy trial: only random cropping's claim
    assert claims(study.summary)[0][0].startswith("Random cropping")
    rows = [line for line in study.summary.splitlines() if line.startswith(("| none |", "| crop |"))]
    assert len(rows) == 2, study.summary
    assert {"none_test_acc", "crop_test_acc", "crop_vs_none", "noise_threshold"} <= set(study.metrics)


# --- what each trial trains with: the command DVC runs, composed as train.py composes it -----------

@cache
def commands() -> dict[str, str]:
    """Each stage's command, as DVC renders it from dvc.yaml and params.yaml."""
    from dvc.repo import Repo

    return {stage.name: stage.cmd for stage in Repo(str(ROOT)).stage.collect(str(STUDY / "dvc.yaml"))}


def augment_overrides(key: str) -> list[str]:
    """The ``augment`` overrides of trial ``key``'s train command."""
    return [w for w in shlex.split(commands()[f"train@{key}"]) if w.startswith(("augment=", "augment."))]


def distortions(compose, *overrides: str) -> dict:
    augment = compose(*overrides).augment
    return {name: entry for name, entry in augment.items() if entry is not None}


@pytest.mark.parametrize("key", [k for k in PARAMS["trials"] if k.split("_s")[0] not in POLICIES])
def test_a_single_distortion_trial_trains_with_exactly_that_distortion_as_the_policies_define_it(compose, key):
    composed = distortions(compose, *augment_overrides(key))
    assert list(composed) == [key]
    assert composed[key] == compose("augment=heavy").augment[key]   # heavy holds every distortion of the notes


@pytest.mark.parametrize("key", [k for k in PARAMS["trials"] if k.split("_s")[0] in POLICIES])
def test_a_policy_trial_trains_with_the_whole_policy(compose, key):
    policy = key.split("_s")[0]
    assert distortions(compose, *augment_overrides(key)) == distortions(compose, f"augment={policy}")


def test_every_distortion_of_the_policies_has_a_trial_of_its_own(compose):
    assert set(distortions(compose, "augment=heavy")) <= set(PARAMS["trials"])


# --- the verdicts, on made-up accuracies ----------------------------------------------------------

def trial(key: str, accuracy: float) -> Trial:
    history = [{"epoch": "0", "train_acc": "0.5", "val_acc": f"{accuracy - 0.1}"},
               {"epoch": "1", "train_acc": "0.9", "val_acc": f"{accuracy}"}]
    return Trial(key, {}, ROOT, {"test/acc": accuracy}, history)


NONE = {"none": 0.50, "none_s1": 0.54, "none_s2": 0.52}          # spread 4 points, mean 52%
MADE_UP = {**NONE, "mirror": 0.53, "crop": 0.40, "rotation": 0.60, "colour_shift": 0.61, "pca_colour": 0.45,
           "light": 0.58, "standard": 0.60, "standard_s1": 0.62, "heavy": 0.57}
NOTES = {"mirroring": ["mirror"], "random cropping": ["crop"], "rotation": ["rotation"],
         "shearing": ["shear"], "colour shifting": ["colour_shift", "pca_colour"]}


@pytest.fixture
def summary():
    return measure({}, [trial(k, a) for k, a in MADE_UP.items()], NOTES, min_effect=0.01)


def test_the_noise_is_the_spread_of_the_seeds_without_augmentation(summary):
    none = np.array(list(NONE.values()))
    assert summary.metrics["noise_threshold"] == pytest.approx(np.ptp(none))
    assert summary.metrics["none_test_acc"] == pytest.approx(none.mean())
    assert summary.metrics["standard_test_acc"] == pytest.approx(np.mean([0.60, 0.62]))   # seeds averaged
    assert summary.metrics["crop_vs_none"] == pytest.approx(0.40 - none.mean())


def test_a_distortion_helps_or_hurts_only_beyond_the_noise(summary):
    verdicts = {claim.claim.split(" is ")[0]: claim.verdict for claim in summary.claims[1:]}
    assert verdicts == {"Mirroring": "not reproduced at this budget",   # +1 point: within the 4-point noise
                        "Random cropping": "refuted",                   # -12 points
                        "Rotation": "confirmed",                        # +8 points
                        # one colour shift helps (+9), the other hurts (-7): no verdict either way
                        "Colour shifting": "not reproduced at this budget"}   # shearing: no trial, no claim


def test_the_overall_claim_is_judged_on_the_policies(summary):
    overall = summary.claims[0]
    assert overall.claim.startswith("Data augmentation improves")
    assert overall.verdict == "confirmed"      # light +6, standard +9, heavy +5 points: all beyond 4
    assert "3 of 3 policies help" in overall.measured
    worse = measure({}, [trial(k, a) for k, a in {**MADE_UP, "light": 0.45}.items()], NOTES)
    assert worse.claims[0].verdict == "not reproduced at this budget"   # one policy hurts


def test_one_seed_without_augmentation_leaves_min_effect_as_the_noise():
    summary = measure({}, [trial("none", 0.5), trial("light", 0.505), trial("heavy", 0.45)], {}, min_effect=0.01)
    assert summary.metrics["noise_threshold"] == 0.01
    overall = summary.claims[0]   # light +0.5 points (within 1), heavy -5: one hurts, not a majority of two
    assert "0 of 2 policies help, 1 hurt" in overall.measured and overall.verdict == "not reproduced at this budget"
