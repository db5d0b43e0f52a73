"""Every model of the zoo trains through the project's own path; families at 32, 64 and 224 px."""


import pytest
import pytorch_lightning as pl
import torch

from cnnlab import create_model
from cnnlab.training.run import build
from conftest import CONF_DIR, tiny_overrides

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
FAMILY_MEMBERS = ["vgg11_bn", "resnet18", "resnet50", "plain18", "googlenet", "inception_v1", "mobilenet_v1",
                  "mobilenet_v2", "efficientnet_b0"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_model_trains_a_step_from_its_config(compose, tmp_path, model):
    cfg = compose(*tiny_overrides(tmp_path), f"model={model}", "data.source.train_size=16",
                  "data.source.val_size=8", "data.source.test_size=8", "data.batch_size=8", "logger=none")
    pl.seed_everything(0)
    datamodule, module = build(cfg)
    before = module.net.head.fc.weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    assert not torch.equal(before, module.net.head.fc.weight)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def forward_backward(net, resolution: int):
    images = torch.randn(2, 3, resolution, resolution)
    logits = net(images)
    logits.sum().backward()
    return logits


@pytest.mark.parametrize("model", FAMILY_MEMBERS)
@pytest.mark.parametrize("resolution", [32, 64, pytest.param(224, marks=pytest.mark.slow)])
def test_each_family_runs_forward_and_backward(model, resolution):
    torch.manual_seed(0)
    net = create_model(model, num_classes=10)
    logits = forward_backward(net, resolution)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2", "efficientnet_b0", "googlenet", "vgg11"])
def test_construction_is_deterministic_from_a_seed(model):
    slim = {"width_mult": 0.25} if model != "efficientnet_b0" else {}

    def weights(seed):
        torch.manual_seed(seed)
        return create_model(model, num_classes=10, **slim).state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
