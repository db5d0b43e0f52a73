"""ONNX export of every family in the zoo: onnxruntime gives PyTorch's logits within 1e-4.

Small widths and 64 px keep each export to seconds; BatchNorm statistics and classifiers are drawn at
random first, so that the logits carry every layer's work (a fresh net's zero-initialised paths could
hide a wrong one), and a batch other than the export's shows that the batch axis stayed dynamic.
"""

import pytest
import torch

from cnnlab.inference.export import TOLERANCE, export_onnx, largest_difference
from cnnlab.models import model_config
from cnnlab.training.module import ImageClassifier

FAMILIES = {  # one config per block type and head of the zoo
    "resnet18": {}, "resnet50": {}, "plain18": {}, "vgg11_bn": {"head_hidden": [64, 64]}, "googlenet": {},
    "inception_v1": {}, "mobilenet_v1": {}, "mobilenet_v2": {}, "efficientnet_b0": {}, "resnet_small": {},
}


def randomised(name: str, **overrides) -> ImageClassifier:
    torch.manual_seed(0)
    module = ImageClassifier(model=model_config(name, width_mult=0.25, **overrides), classes=list("abcde"),
                             optimizer={})
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5), layer.bias.normal_(0, 0.1)
                layer.running_mean.normal_(0, 0.1), layer.running_var.uniform_(0.5, 1.5)
            elif isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.05), layer.bias.normal_(0, 0.05)
    return module.eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_exports_and_onnxruntime_agrees_with_pytorch(name, tmp_path):
    module = randomised(name, **FAMILIES[name])
    path = export_onnx(module, tmp_path / f"{name}.onnx", 64, {"cnnlab.model": name})
    difference = largest_difference(module, path, 64, batch=3)
    assert difference <= TOLERANCE
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert module(images).std() > 50 * TOLERANCE  # the logits vary: agreement within 1e-4 means something


def test_a_wrong_export_is_caught(tmp_path):
    """The check is not blind: a model changed after export differs by more than the tolerance."""
    module = randomised("resnet_small")
    path = export_onnx(module, tmp_path / "m.onnx", 64, {})
    with torch.no_grad():
        module.net.head.fc.bias.add_(0.01)
    assert largest_difference(module, path, 64) > TOLERANCE
