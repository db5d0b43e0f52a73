"""pipelines/separable_cost: tiny, end to end; and its counts against the notes' arithmetic and closed forms."""

import pytest
import torch

from cnnlab.analysis.cost import count_macs, stage_costs, total_row
from cnnlab.studies.separable_cost import NOTES_EXAMPLE, Layer, normal_conv, normal_twin, separable_conv
from cnnlab.studies.timing import calls_per_block, spread, timed_samples
from study_runs import check_study, claims, run_study

TINY = {"layers": {"size": 8, "channels": [4, 8], "kernels": [3]},
        "timing": {"batch": 1, "repeats": 3, "min_block_s": 0.001, "threads": 1},   # one thread: no stalls on a busy CPU
        "network": {"model": "mobilenet_v1", "width": 0.25, "resolution": 32}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return run_study(tmp_path_factory.mktemp("study"), "separable_cost", TINY)


@pytest.mark.slow
def test_the_study_runs_and_summarises(study):
    check_study(study, expected_claims=3)
    assert "| 6x6x3, 5 filters 3x3 (the notes' example, valid padding) | 2,160 | 432 + 240 | 0.311 | 0.311 |" \
        in study.summary
    assert study.metrics["notes_example_normal_macs"] == 2160
    assert study.metrics["notes_example_separable_macs"] == 672
    assert {"c4_f3_mac_ratio", "c8_f3_time_ratio", "network_mac_saving"} <= set(study.metrics)
    found = claims(study.summary)
    assert found[0][2] == "confirmed"   # the formula is arithmetic: it holds at any size
    assert found[1][0].startswith("~10 times cheaper (multiplies)")


def test_the_notes_example_gives_the_notes_numbers():
    """6x6x3 input, 5 filters of 3x3x3, valid padding: 4x4 positions."""
    normal = 3 * 3 * 3 * (4 * 4) * 5          # 2160
    depthwise = 3 * 3 * (4 * 4) * 3           # 432
    pointwise = 1 * 1 * 3 * (4 * 4) * 5       # 240
    shape = (1, 3, 6, 6)
    separable = separable_conv(NOTES_EXAMPLE)
    assert count_macs(normal_conv(NOTES_EXAMPLE), shape) == normal == 2160
    assert count_macs(separable[0], shape) == depthwise == 432
    assert count_macs(separable, shape) == depthwise + pointwise == 672
    assert normal_conv(NOTES_EXAMPLE)(torch.zeros(shape)).shape == (1, 5, 4, 4)
    assert (depthwise + pointwise) / normal == pytest.approx(1 / 5 + 1 / 3 ** 2)


@pytest.mark.parametrize(("channels", "kernel"), [(16, 3), (64, 5), (32, 7)])
def test_same_padding_layers_count_the_closed_forms(channels, kernel):
    layer, n = Layer(10, channels, channels, kernel), 10
    shape = (1, channels, n, n)
    normal = n * n * kernel ** 2 * channels * channels
    separable = n * n * kernel ** 2 * channels + n * n * channels * channels
    assert count_macs(normal_conv(layer), shape) == normal
    assert count_macs(separable_conv(layer), shape) == separable
    assert separable / normal == pytest.approx(layer.formula)


def test_the_normal_twin_of_mobilenet_v1_counts_its_closed_form(compose):
    """MobileNet v1 at 224 px (Howard et al., table 1): each block a 3x3 conv of (in, out, output size)."""
    blocks = [(32, 64, 112), (64, 128, 56), (128, 128, 56), (128, 256, 28), (256, 256, 28), (256, 512, 14),
              *[(512, 512, 14)] * 5, (512, 1024, 7), (1024, 1024, 7)]
    stem, head = 3 * 3 * 3 * 32 * 112 * 112, 1024 * 1000
    normal = stem + sum(9 * i * o * s * s for i, o, s in blocks) + head
    separable = stem + sum(9 * i * s * s + i * o * s * s for i, o, s in blocks) + head
    model = compose("model=mobilenet_v1").model
    with torch.device("meta"):
        nets = {"separable": instantiate(model), "normal": instantiate(normal_twin(model))}
    macs = {kind: total_row(stage_costs(net, 224)).macs for kind, net in nets.items()}
    assert macs == {"separable": separable, "normal": normal}
    assert not any(m.groups > 1 for m in nets["normal"].modules() if isinstance(m, torch.nn.Conv2d))


def instantiate(model):
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(model, num_classes=1000)


def test_timing_blocks_last_long_enough_and_interleave(monkeypatch):
    """On a clock that only the calls move (1 ms each): blocks double to the minimum, samples are per call."""
    clock, order = [0.0], []
    monkeypatch.setattr("cnnlab.studies.timing.time.perf_counter", lambda: clock[0])

    def call(name):
        def tick():
            clock[0] += 0.001
            order.append(name)
        return tick

    assert calls_per_block(call("x"), 0.004) == 4           # 1, 2, 4 calls: the first block of 4 ms
    order.clear()
    samples = timed_samples({"a": call("a"), "b": call("b")}, 3, 0.002)
    assert samples == {"a": [pytest.approx(0.001)] * 3, "b": [pytest.approx(0.001)] * 3}
    assert order[-12:] == ["a", "a", "b", "b"] * 3          # after warm-up and calibration: interleaved blocks
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4 - 2) / 3)
