"""GoogLeNet's auxiliary classifiers: off by default, training-only when on (``model.aux_heads=true``)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cnnlab.errors import ConfigError
from cnnlab.models import count_parameters
from cnnlab.models.net import AuxHead
from cnnlab.training.module import ImageClassifier

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
AUX = "model.aux_heads=true"


def config(model: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"model={model}", *overrides])


def build(model: str, *overrides: str, num_classes: int = 1000, meta: bool = False, **kwargs):
    with torch.device("meta" if meta else "cpu"):
        return instantiate(config(model, *overrides).model, num_classes=num_classes, **kwargs)


@pytest.mark.parametrize("model, without, with_aux", [
    ("googlenet", 6_624_904, 13_004_888),  # torchvision googlenet(aux_logits=True, init_weights=False)
    ("inception_v1", 7_005_832, 13_385_816),
])
def test_aux_heads_are_off_by_default_and_on_give_torchvisions_count(model, without, with_aux):
    plain, aux = build(model, meta=True), build(model, AUX, meta=True)
    assert plain.aux_heads is None and count_parameters(plain) == without
    assert count_parameters(aux) == with_aux
    assert list(aux.aux_heads) == ["inception4a", "inception4d"]
    # 4a and 4d in our stage table: stage 1 starts with its max pool
    assert aux.aux_at == {"inception4a": (1, 1), "inception4d": (1, 4)}
    assert [aux.stages[1][b].out_chs for b in (1, 4)] == [512, 528]
    head = aux.aux_heads["inception4a"]
    assert isinstance(head, AuxHead) and head.conv[1].eps == 1e-3 and head.dropout.p == 0.7
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (2048, 1024, 1000)
    assert aux.aux_weight == 0.3


def test_forward_gives_the_main_logits_only_and_forward_with_aux_adds_two_heads():
    torch.manual_seed(0)
    net = build("googlenet", AUX, "scaling.width=0.25", num_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits = net(x)
        main, aux = net.forward_with_aux(x)
    assert torch.is_tensor(logits) and logits.shape == (3, 5)
    assert torch.allclose(main, logits, atol=1e-6)
    assert len(aux) == 2 and all(a.shape == (3, 5) and torch.isfinite(a).all() for a in aux)
    plain = build("googlenet", "scaling.width=0.25", num_classes=5)
    main, aux = plain.forward_with_aux(x)
    assert main.shape == (3, 5) and aux == []


def test_an_attach_point_the_model_lacks_is_a_config_error():
    with pytest.raises(Exception) as raised:
        build("googlenet", AUX, "model.aux_head.at.inception4a=[1,9]", meta=True)
    cause = raised.value
    while not isinstance(cause, ConfigError):  # hydra's instantiate wraps it
        cause = cause.__cause__
    assert str(cause).startswith("aux head 'inception4a' reads [stage, block] [1, 9]")


def _classifier(model_cfg, optimizer=None) -> ImageClassifier:
    return ImageClassifier(model=OmegaConf.to_container(model_cfg, resolve=True), classes=list("abc"),
                           optimizer=optimizer or {"_target_": "torch.optim.SGD", "lr": 0.1})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_the_training_loss_adds_the_weighted_aux_losses_and_evaluation_does_not():
    torch.manual_seed(0)
    module = _classifier(config("googlenet", AUX, "scaling.width=0.25", "model.aux_head.weight=0.5").model)
    images, labels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    module.train()
    torch.manual_seed(1)
    loss = module._step((images, labels), "train")
    torch.manual_seed(1)
    main, aux = module.net.forward_with_aux(module._normalise(images))
    ce = torch.nn.functional.cross_entropy
    expected = ce(main, labels) + 0.5 * (ce(aux[0], labels) + ce(aux[1], labels))
    assert torch.allclose(loss, expected) and not torch.allclose(loss, ce(main, labels))
    module.eval()
    with torch.no_grad():
        assert torch.allclose(module._step((images, labels), "val"), ce(module(images), labels))


def test_a_lightning_training_step_trains_the_aux_heads(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    module = _classifier(config("googlenet", AUX, "scaling.width=0.25").model)
    before = {k: v.clone() for k, v in module.net.aux_heads.state_dict().items()}
    data = TensorDataset(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), torch.randint(0, 3, (8,)))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=4))
    after = module.net.aux_heads.state_dict()
    for name in ("inception4a", "inception4d"):
        for tensor in ("conv.0.weight", "fc1.weight", "fc2.weight", "fc2.bias"):
            key = f"{name}.{tensor}"
            assert not torch.equal(before[key], after[key]), key
