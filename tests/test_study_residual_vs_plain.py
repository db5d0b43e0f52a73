"""pipelines/residual_vs_plain: tiny, end to end on real photographs (as a user's own images), and its two
measurements against facts of their own."""

import json

import pytest
import torch

from cnnlab import create_model
from cnnlab.models.blocks import BasicBlock
from cnnlab.studies.residual_vs_plain import block_changes, weight_layers
from study_runs import check_study, claims, run_study
from test_real_images import build, crops  # noqa: F401 (crops: a fixture)


@pytest.fixture(scope="module")
def study(tmp_path_factory, crops):
    """The study as docs/studies.md says to run it on one's own images: a folder in a Kaggle-like layout."""
    images = build(tmp_path_factory.mktemp("photos"), crops, {"train": 20, "test": 8})
    tiny = {"data": f"data=imagefolder data.source.root={images} data.source.stored_size=32 data.image_size=32",
            "epochs": 1,
            "trials": {"plain_8": {"residual": False, "depth": 1}, "residual_8": {"residual": True, "depth": 1}}}
    return run_study(tmp_path_factory.mktemp("study"), "residual_vs_plain", tiny)


@pytest.mark.slow
def test_the_study_runs_and_summarises(study):
    check_study(study, expected_claims=3)
    meta = json.loads(next((study.folder / "results/data").glob("*/meta.json")).read_text())
    assert meta["classes"] == ["china", "flower", "hopper"]  # the photographs, cached in the study's folder
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in study.summary.splitlines()
            if line.startswith(("| plain_8 ", "| residual_8 "))}
    assert set(rows) == {"plain_8", "residual_8"}
    assert rows["plain_8"][2] == rows["residual_8"][2] == "8"     # weight layers: 2 + 6 x depth
    assert rows["plain_8"][3] == rows["residual_8"][3]             # pad shortcuts: the same parameters
    assert {"plain_8_train_error", "residual_8_train_error"} <= set(study.metrics)
    assert claims(study.summary)[0][0].startswith("Skip connections")


@pytest.mark.parametrize(("model", "layers"), [("resnet18", 18), ("resnet34", 34), ("plain34", 34), ("resnet50", 50)])
def test_weight_layers_are_the_papers_depths(model, layers):
    with torch.device("meta"):
        net = create_model(model, num_classes=10)
    assert weight_layers(net) == layers


class Wrapped(torch.nn.Module):
    """What block_changes measures: a module with ``net`` that takes images."""
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_a_residual_block_whose_branch_is_zero_is_the_identity():
    torch.manual_seed(0)
    block = BasicBlock(8, 8, residual=True)
    plain = BasicBlock(8, 8, residual=False)
    x = torch.rand(4, 8, 6, 6)  # non-negative, as after a ReLU
    torch.nn.init.zeros_(block.conv2[1].weight)  # the second BatchNorm: the branch outputs its bias, 0
    assert block_changes(Wrapped(torch.nn.Sequential(block)), x) == [pytest.approx(0, abs=1e-6)]
    change = block_changes(Wrapped(torch.nn.Sequential(plain)), x)[0]
    expected = ((plain.eval()(x) - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).mean().item()
    assert change == pytest.approx(expected) and change > 0.1
