"""pipelines/compound_scaling: tiny, end to end; and its measurements against closed forms of their own."""

import math

import numpy as np
import pytest
import torch

from cnnlab import create_model
from cnnlab.analysis.cost import count_macs
from cnnlab.models.blocks import InvertedResidual
from cnnlab.resolvers import compound
from cnnlab.studies.compound_scaling import (Point, claims as judge, compound_advantages, direction,
                                             gains_per_doubling, interpolate, lines, noise_margin, resolution)
from study_runs import check_study, claims, run_study

# the compound trial two steps out: its line must reach width_1's multiply-adds for a matched comparison,
# which one step (x1.1 width, x1.15 resolution, depth x1.2 in whole blocks) need not on every base
TINY = {"data": {"render_size": 48, "train_size": 40, "val_size": 20, "test_size": 20}, "epochs": 1,
        "trials": {"base": {"phi": 0, "alpha": 1, "beta": 1, "gamma": 1},
                   "width_1": {"phi": 1, "alpha": 1, "beta": 1.5, "gamma": 1},
                   "compound_2": {"phi": 2, "alpha": 1.2, "beta": 1.1, "gamma": 1.15}}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_study(tmp_path_factory.mktemp("study"), "compound_scaling", TINY)


@pytest.mark.slow
def test_the_study_runs_and_summarises(study):
    check_study(study, expected_claims=3)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in study.summary.splitlines()
            if line.startswith(("| base ", "| width_1 ", "| compound_2 "))}
    assert rows["base"][1] == "base" and rows["width_1"][1] == "width" and rows["compound_2"][1] == "compound"
    # the base's size, width and depth scaled by the trial's coefficients, as its config scaled them
    base, width, both = study.params["base"], TINY["trials"]["width_1"], TINY["trials"]["compound_2"]
    assert rows["base"][5] == f"{base['resolution']} px"
    assert rows["compound_2"][5] == f"{compound(base['resolution'], both['gamma'], 2)} px"
    assert rows["width_1"][3] == f"{compound(base['width'], width['beta'], 1):.3g}"
    assert rows["compound_2"][4] == f"{compound(base['depth'], both['alpha'], 2):.3g}"
    assert study.metrics["base_macs_ratio"] == 1.0
    assert study.metrics["width_1_macs_ratio"] > 1.5 and study.metrics["compound_2_macs_ratio"] > 1.5
    # the compound line (base -> compound_2) reaches width_1's cost: one matched comparison
    assert "compound_advantage_over_width" in study.metrics
    assert claims(study.summary)[2][0].startswith("Compound scaling")


def test_an_mbconv_block_costs_its_closed_form():
    """EfficientNet's MBConv6 3x3 (16 -> 24, stride 2, squeeze-excite to 16/4 = 4) on 56 x 56, counted by hand."""
    block = InvertedResidual(16, 24, stride=2, expansion=6, kernel=3, act="silu", se_ratio=0.25)
    expand = 56 * 56 * 16 * 96            # 1x1, 16 -> 96 channels
    depthwise = 28 * 28 * 96 * 3 * 3      # 3x3 per channel, stride 2
    excite = 96 * 4 + 4 * 96              # pooled 96 -> 4 -> 96
    project = 28 * 28 * 96 * 24           # 1x1, 96 -> 24
    assert count_macs(block, (1, 16, 56, 56)) == expand + depthwise + excite + project


@pytest.fixture(scope="module")
def b0_macs():
    """Multiply-adds of EfficientNet-B0's stage table scaled by (w, d) at r px, built on the meta device."""
    def macs(width: float = 1.0, depth: float = 1.0, size: int = 224) -> int:
        with torch.device("meta"):
            net = create_model("efficientnet", width_mult=width, depth_mult=depth)
        return count_macs(net, (1, 3, size, size))
    return macs


def test_multiply_adds_grow_as_r_squared_w_squared_and_d(b0_macs):
    """The paper's section 3.3: FLOPs grow as d, w^2 and r^2. At 224 px every stride halves the map exactly;
    what does not follow the factor is small: the classifier (r), depthwise convolutions and the RGB stem (w),
    the stem and head, and each stage's first block, which downsamples and costs less than its repeats (d)."""
    base = b0_macs()
    assert base == pytest.approx(386e6, rel=0.01)                     # B0: 0.39 B FLOPs in the paper's table 2
    assert b0_macs(size=448) / base == pytest.approx(2 ** 2, rel=0.01)
    assert 0.9 * 2 ** 2 < b0_macs(width=2.0) / base < 2 ** 2
    assert b0_macs(depth=2.0) / base == pytest.approx(2, rel=0.05)


def test_a_trials_direction_and_resolution_follow_its_coefficients(compose):
    assert direction({"phi": 0, "alpha": 1.2, "beta": 1.1, "gamma": 1.15}) == "base"
    assert direction({"phi": 2, "alpha": 1, "beta": 1.5, "gamma": 1}) == "width"
    assert direction({"phi": 1, "alpha": 1, "beta": 1, "gamma": 1.25}) == "resolution"
    assert direction({"phi": 1, "alpha": 1.2, "beta": 1.1, "gamma": 1.15}) == "compound"
    # the size the summary counts at is the size the trial's config gives the data (dvc.yaml's overrides)
    entry = {"phi": 2, "alpha": 1.2, "beta": 1.1, "gamma": 1.15}
    cfg = compose("model=efficientnet", "scaling=custom", *(f"scaling.{k}={v}" for k, v in entry.items()),
                  'scaling.width="${compound:0.5,1.1,2}"', 'scaling.depth="${compound:0.5,1.2,2}"',
                  'scaling.resolution="${compound:32,1.15,2}"')
    assert cfg.data.image_size == resolution({"resolution": 32}, entry) == round(32 * 1.15 ** 2)
    assert cfg.model.width_mult == pytest.approx(0.5 * 1.1 ** 2)
    assert cfg.model.depth_mult == pytest.approx(0.5 * 1.2 ** 2)


def line(*pairs, way="width"):
    return [Point(None, way, i, 1, 1, 32, 0, macs, accuracy) for i, (macs, accuracy) in enumerate(pairs)]


def test_the_verdicts_follow_the_numbers():
    """Paper-like numbers: every dimension gains less and less, compound more for the cost; then the opposite."""
    base = line((1e6, 0.50), way="base")
    singles = [p for way in ("resolution", "depth", "width") for p in line((2e6, 0.60), (4e6, 0.64), way=way)]
    compound = line((2e6, 0.70), (4e6, 0.78), way="compound")
    by_direction = lines(base + singles + compound)
    assert [c.verdict for c in judge(by_direction, compound_advantages(by_direction), 0.02)] == ["confirmed"] * 3
    worse = line((2e6, 0.52), (4e6, 0.55), way="compound")
    by_direction = lines(base + singles + worse)
    assert judge(by_direction, compound_advantages(by_direction), 0.02)[2].verdict == "refuted"


def test_interpolation_is_linear_in_log_multiply_adds():
    curve = line((1e6, 0.4), (4e6, 0.6), (8e6, 0.9))
    for macs in (1e6, 1.5e6, 2e6, 4e6, 5e6, 8e6):
        assert interpolate(curve, macs) == pytest.approx(np.interp(math.log(macs), np.log([1e6, 4e6, 8e6]), [0.4, 0.6, 0.9]))
    assert interpolate(curve, 0.9e6) is None and interpolate(curve, 9e6) is None   # never extrapolated


def test_gains_per_doubling_and_the_noise_margin():
    assert gains_per_doubling(line((1e6, 0.4), (4e6, 0.6), (8e6, 0.7))) == pytest.approx([0.1, 0.1])
    # a binomial accuracy's standard error is sqrt(p (1 - p) / n); a difference of two has sqrt(2) times it
    draws = np.random.default_rng(0).binomial(1000, 0.7, size=(2, 20000)) / 1000
    assert noise_margin(0.7, 1000) == pytest.approx(2 * np.std(draws[0] - draws[1]), rel=0.03)
