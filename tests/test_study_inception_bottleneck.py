"""pipelines/inception_bottleneck: tiny, end to end; and its counts against the notes' arithmetic and closed forms."""

import pytest
import torch
from hydra import initialize_config_dir

from cnnlab.studies.inception_bottleneck import (WITH, WITHOUT, accuracy_gap, binomial_error, module_pairs,
                                                 notes_arithmetic, notes_example)
from conftest import CONF_DIR
from study_runs import check_study, claims, run_study

TINY = {"data": "data=shapes data.source.image_size=32 data.source.train_size=40 data.source.val_size=20 "
                "data.source.test_size=20", "width": 0.25, "epochs": 1,
        "modules": {"model": "inception_v1", "resolution": 32},
        "timing": {"batch": 1, "repeats": 3, "min_block_s": 0.001, "threads": 1}}   # one thread: no stalls on a busy CPU


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_study(tmp_path_factory.mktemp("study"), "inception_bottleneck", TINY)


@pytest.mark.slow
def test_the_study_runs_and_summarises(study):
    check_study(study, expected_claims=4)  # the example; multiplies; CPU time; accuracy
    assert "| **5x5 branch of 3a** (the notes' example) | 4x4x192 |" in study.summary   # 32 px: 3a sees 4x4
    assert "| inception 5b | 1x1x832 |" in study.summary
    trials = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in study.summary.splitlines()
              if line.startswith(("| with_1x1 ", "| without_1x1 "))}
    assert trials["with_1x1"][1] == "yes" and trials["without_1x1"][1] == "no"
    assert int(trials["with_1x1"][2].replace(",", "")) < int(trials["without_1x1"][2].replace(",", ""))
    assert study.metrics["example_macs_without"] == 4 * 4 * 32 * 5 * 5 * 192
    assert {"with_1x1_test_acc", "without_1x1_test_acc", "network_mac_saving"} <= set(study.metrics)
    assert claims(study.summary)[3][2] == "not reproduced at this budget"   # one epoch on 40 images learns nothing


@pytest.fixture(scope="module")
def modules_at_224():
    """inception_v1's modules at full width and 224 px, built on the meta device (shapes only, no weights)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), torch.device("meta"):
        return module_pairs("inception_v1", 224)


def test_the_notes_example_costs_120m_and_12_4m(modules_at_224):
    """28x28x192 in, 32 filters of 5x5 ("same"): 120.4M; through a 1x1 to 16 channels first: 2.4M + 10.0M."""
    without = 28 * 28 * 32 * (5 * 5 * 192)
    reduce, conv = 28 * 28 * 16 * 192, 28 * 28 * 32 * (5 * 5 * 16)
    assert (without, reduce + conv) == (120_422_400, 12_443_648)
    example = notes_example(modules_at_224[0])
    assert example["shape"] == (1, 192, 28, 28)
    assert example["macs"] == {WITHOUT: without, WITH: reduce + conv}
    assert notes_arithmetic(example) == {WITHOUT: without, "1x1": reduce, "kxk": conv}


def test_module_3a_without_reductions_counts_its_closed_form(modules_at_224):
    """Inception 3a (GoogLeNet table 1: 64 | 96->128 | 16->32 | pool->32) on 28x28x192, with and without."""
    n, c = 28 * 28, 192
    with_1x1 = n * (c * 64 + c * 96 + 9 * 96 * 128 + c * 16 + 25 * 16 * 32 + c * 32)
    without = n * (c * 64 + 9 * c * 128 + 25 * c * 32 + c * 32)
    first = modules_at_224[0]
    assert first["name"] == "3a" and first["macs"] == {WITH: with_1x1, WITHOUT: without}
    bn = 2 * (64 + 128 + 32 + 32)   # every conv is conv-BN-ReLU: BatchNorm's scale and shift
    assert first["params"][WITHOUT] == c * 64 + 9 * c * 128 + 25 * c * 32 + c * 32 + bn
    assert [p["name"] for p in modules_at_224] == ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"]
    assert all(p["macs"][WITHOUT] > p["macs"][WITH] for p in modules_at_224)


def test_the_accuracy_yardstick_is_the_binomial_standard_error():
    a = {"accuracy": 0.9, "images": 100}
    b = {"accuracy": 0.8, "images": 400}
    assert binomial_error(a) == pytest.approx(0.03)            # sqrt(0.9 x 0.1 / 100)
    gap, error = accuracy_gap(a, b)
    assert gap == pytest.approx(0.1) and error == pytest.approx((0.03 ** 2 + 0.02 ** 2) ** 0.5)
