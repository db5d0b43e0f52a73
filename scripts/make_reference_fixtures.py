"""Make tests/fixtures/reference/: what torchvision and timm compute, for tests that cannot import them.

Run with the reference environment (torchvision 0.28, timm 1.0.31 on torch 2.13), never the project's:

    PY=$(../shared/tools/make-reference-venv.sh) && $PY scripts/make_reference_fixtures.py

Real weights would take hundreds of MB, so the models get synthetic weights that the tests rebuild
exactly from the key list alone (``synthetic_state_dict``, which tests/test_pretrained.py imports from
this file; it needs torch only): integers
from a per-tensor seeded ``torch.randint`` times a scale, which are the same floats on any machine.
Written:
- ``keys.json``: for each reference model, its state dict's (key, shape) in order, as its checkpoint
  files have them (GoogLeNet with its auxiliary classifiers, as torchvision's weights file);
- ``logits_<model>.pt``: an input batch and the reference model's logits with the synthetic weights;
- ``published_weights.json``: the ImageNet weights torchvision and timm publish for the models of conf/model/
  (URL, the evaluation transform, normalisation, accuracy), which conf/model/*.yaml's ``weights`` must match.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"
SEED = 1234
INPUT_SIZE = 64


def synthetic_state_dict(keys: list[tuple[str, list[int]]], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Exactly reproducible weights for a list of (key, shape): integers times a fan-in scale.

    Conv/linear weights ~ uniform with variance 1/fan_in; BatchNorm scales near 1, shifts and
    running means near 0, running variances in [1, 2): activations stay of order one at any depth.
    """
    state = {}
    for i, (key, shape) in enumerate(keys):
        generator = torch.Generator().manual_seed(seed + i)
        ints = torch.randint(-127, 128, shape, generator=generator, dtype=torch.int64).to(torch.float32)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            state[key] = torch.zeros(shape, dtype=torch.int64)
        elif leaf == "running_var":
            state[key] = 1.5 + ints / 256
        elif len(shape) > 1:  # conv or linear weight
            fan_in = math.prod(shape[1:])
            state[key] = ints * (math.sqrt(3.0 / fan_in) / 127)
        elif leaf == "weight":  # BatchNorm scale
            state[key] = 1.0 + ints / 512
        else:  # biases, BatchNorm shifts and running means
            state[key] = ints / 1024
    return state


def reference_models():
    import timm
    import torchvision.models as tv

    return {  # name -> (constructor, whether a logits fixture is made)
        "resnet18": (lambda: tv.resnet18(), True),
        "resnet50": (lambda: tv.resnet50(), True),
        "resnet101": (lambda: tv.resnet101(), False),
        "vgg11": (lambda: tv.vgg11(), True),
        "vgg16": (lambda: tv.vgg16(), False),
        "vgg11_bn": (lambda: tv.vgg11_bn(), True),
        "vgg16_bn": (lambda: tv.vgg16_bn(), False),
        # the weights file holds the auxiliary classifiers; transform_input is a preprocessing step
        # torchvision switches on for its weights, not part of the network
        "googlenet": (lambda: tv.googlenet(aux_logits=True, transform_input=False, init_weights=False), True),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(), True),
        "efficientnet_b0": (lambda: tv.efficientnet_b0(), True),
        "efficientnet_b4": (lambda: tv.efficientnet_b4(), False),
        "efficientnet_b7": (lambda: tv.efficientnet_b7(), True),
        "mobilenet_v1": (lambda: timm.create_model("mobilenetv1_100", pretrained=False), True),
    }


TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn",
               "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "googlenet", "mobilenet_v2",
               *[f"efficientnet_b{i}" for i in range(8)]]


def effective_normalisation(model_name: str, mean, std) -> tuple[list[float], list[float]]:
    """The (mean, std) a model's weights learnt on: torchvision's GoogLeNet re-normalises its input
    (``transform_input``), so pixels 0 and 1 are pushed through the transform and the model's own step."""
    import torchvision.models as tv

    pixels = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if model_name == "googlenet":
        normalised = tv.googlenet(transform_input=True, init_weights=False)._transform_input(normalised)
    at_zero, at_one = normalised[0].flatten(), normalised[1].flatten()
    scale = 1 / (at_one - at_zero)  # normalised = (pixel - m) / s  =>  s = 1 / (n(1) - n(0)), m = -n(0) * s
    return [round(float(v), 6) for v in -at_zero * scale], [round(float(v), 6) for v in scale]


def published_weights() -> dict:
    import timm
    import torchvision.models as tv

    published = {}
    for name in TORCHVISION:
        enum = tv.get_model_weights(name)
        entries = {"DEFAULT": enum.DEFAULT.name}
        for weights in enum:
            preset = weights.transforms()
            mean, std = effective_normalisation(name, preset.mean, preset.std)
            entries[weights.name] = {
                "url": weights.url, "input_size": preset.crop_size[0], "resize_size": preset.resize_size[0],
                "interpolation": preset.interpolation.value, "mean": mean, "std": std,
                "top1": weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]}
        published[name] = entries
    cfg = timm.models.get_pretrained_cfg("mobilenetv1_100")
    published["mobilenet_v1"] = {"DEFAULT": cfg.tag, cfg.tag: {
        "url": f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors",
        "input_size": cfg.input_size[-1], "resize_size": round(cfg.input_size[-1] / cfg.crop_pct),
        "interpolation": cfg.interpolation, "mean": list(cfg.mean), "std": list(cfg.std)}}
    return published


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    images = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    keys = {}
    for name, (make, with_logits) in reference_models().items():
        with torch.device("meta"):
            model = make()
        keys[name] = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        if not with_logits:
            continue
        model = make().eval()
        weights = synthetic_state_dict(keys[name])
        model.load_state_dict(weights)
        with torch.no_grad():
            logits = model(images)
        # lets a test tell weights rebuilt wrongly from weights mapped wrongly
        checksum = sum(float(v.double().sum()) for v in weights.values())
        torch.save({"model": name, "seed": SEED, "weights_sum": checksum, "input": images, "logits": logits},
                   OUT / f"logits_{name}.pt")
        print(f"{name}: logits std {logits.std():.3f}, max |logit| {logits.abs().max():.3f}")
    (OUT / "keys.json").write_text(json.dumps(keys, indent=0) + "\n")
    (OUT / "published_weights.json").write_text(json.dumps(published_weights(), indent=1) + "\n")
    sizes = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{len(keys)} models in keys.json; fixtures {sizes / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
