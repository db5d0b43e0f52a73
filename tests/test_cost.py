"""Cost analysis: the course notes' arithmetic and the reference models' multiply-adds, all counted
by the one function the cost table uses (torch's FlopCounterMode underneath)."""

import csv

import pytest
import torch
from torch import nn

from cnnlab import create_model
from cnnlab.analysis.cost import count_macs, format_table, stage_costs, write_table
from cnnlab.errors import ConfigError
from conftest import run_script


def conv(in_chs, out_chs, kernel, groups=1, padding=0):
    return nn.Conv2d(in_chs, out_chs, kernel, padding=padding, groups=groups, bias=False)


def test_normal_vs_depthwise_separable_convolution():
    # 6x6x3 input, five 3x3x3 filters, valid padding -> 4x4x5
    assert count_macs(conv(3, 5, 3), (1, 3, 6, 6)) == 2160
    depthwise, pointwise = conv(3, 3, 3, groups=3), conv(3, 5, 1)
    assert count_macs(depthwise, (1, 3, 6, 6)) == 432
    assert count_macs(pointwise, (1, 3, 4, 4)) == 240
    separable = nn.Sequential(depthwise, pointwise)
    assert count_macs(separable, (1, 3, 6, 6)) == 672
    n_c, f = 5, 3
    assert 672 / 2160 == pytest.approx(1 / n_c + 1 / f**2) == pytest.approx(0.311, abs=5e-4)


def test_inception_bottleneck_cost():
    # 28x28x192 -> 5x5 "same" conv, 32 filters: ~120M; with a 16-channel 1x1 bottleneck first: ~12.4M
    shape = (1, 192, 28, 28)
    assert count_macs(conv(192, 32, 5, padding=2), shape) == 120_422_400
    bottleneck = nn.Sequential(conv(192, 16, 1), conv(16, 32, 5, padding=2))
    assert count_macs(bottleneck[0], shape) == 2_408_448
    assert count_macs(bottleneck[1], (1, 16, 28, 28)) == 10_035_200
    assert count_macs(bottleneck, shape) == 12_443_648


def test_one_by_one_convolution_shape_and_cost():
    one_by_one = conv(192, 32, 1)
    assert one_by_one(torch.zeros(1, 192, 28, 28)).shape == (1, 32, 28, 28)  # 28x28x192 -> 28x28x32
    assert count_macs(one_by_one, (1, 192, 28, 28)) == 28 * 28 * 32 * 192


def build_meta(model: str, num_classes: int = 1000):
    with torch.device("meta"):
        return create_model(model, num_classes=num_classes)


@pytest.mark.parametrize("model, gmacs, tolerance", [
    ("resnet50", 4.09, 0.01),        # torchvision's v1.5 (stride on the 3x3); v1 would be 3.86
    ("vgg16", 15.5, 0.01),
    ("mobilenet_v2", 0.30, 0.03),
    ("efficientnet_b0", 0.39, 0.03),
    ("mobilenet_v1", 0.569, 0.01),   # timm mobilenetv1_100
])
def test_reference_models_per_stage(model, gmacs, tolerance):
    net = build_meta(model)
    rows = stage_costs(net, 224)
    assert [r.name for r in rows] == ["stem", *(f"stage {i}" for i in range(1, len(net.stages) + 1)), "head"]
    total = sum(r.macs for r in rows)
    assert total == count_macs(net, (1, 3, 224, 224))  # the parts add up to the whole net
    assert total / 1e9 == pytest.approx(gmacs, rel=tolerance)
    assert sum(r.params for r in rows) == sum(p.numel() for p in net.parameters())
    assert rows[-1].output_shape == (1000,)


def test_stage_shapes_and_tables(tmp_path):
    net = build_meta("resnet50")
    rows = stage_costs(net, 224)
    assert [r.output_shape for r in rows[:-1]] == [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14),
                                                    (2048, 7, 7)]
    text = format_table(rows, "text", "resnet50")
    assert "56x56x256" in text and "25,557,032" in text and "4.09 G" in text
    with open(write_table(rows, tmp_path / "t.csv")) as f:
        table = list(csv.DictReader(f))
    assert table[-1]["part"] == "total" and int(table[-1]["macs"]) == sum(r.macs for r in rows)
    assert "| **total** |" in write_table(rows, tmp_path / "t.md").read_text()
    with pytest.raises(ConfigError, match="at least 32x32"):
        stage_costs(net, 16)
    with pytest.raises(ConfigError, match=r"\.csv, \.md"):
        write_table(rows, tmp_path / "t.pdf")


def test_counting_leaves_the_module_as_it_was():
    net = nn.Sequential(conv(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    net[1].eval()  # e.g. a frozen BatchNorm in a training model
    count_macs(net, (1, 3, 8, 8))
    assert net.training and not net[1].training and net[2].training


@pytest.mark.slow
def test_cost_script(tmp_path):
    result = run_script("cost.py", "model=resnet18", "cost.resolution=224", f"cost.output={tmp_path}/r18.csv")
    assert result.returncode == 0, result.stderr
    assert "resnet18 at 224x224 px" in result.stdout and "11,689,512" in result.stdout
    assert "1.81 G" in result.stdout  # torchvision's resnet18: 1.81 GFLOPS (MACs)
    with open(tmp_path / "r18.csv") as f:
        assert [row["part"] for row in csv.DictReader(f)][-1] == "total"
    result = run_script("cost.py", "model=resnet18", f"cost.output={tmp_path}/r18.md")
    assert result.returncode == 0, result.stderr
    assert "resnet18 at 32x32 px" in (tmp_path / "r18.md").read_text()  # the data's image size by default
    result = run_script("cost.py", "model=resnet18", "cost.output=r18.pdf")
    assert result.returncode == 2 and result.stderr.startswith("Error: cost.output=r18.pdf")
