"""Freezing: what stays frozen really stays, BatchNorm statistics included, and what trains does."""

import pytest
import pytorch_lightning as pl
import torch

from cnnlab.errors import ConfigError
from cnnlab.training.finetune import FreezeStages
from cnnlab.training.run import build
from conftest import tiny_overrides


def snapshot(module):
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {name for name, t in before.items() if t.dtype.is_floating_point and not torch.equal(t, after[name])}


def fit_frozen(compose, tmp_path, *overrides):
    cfg = compose(*tiny_overrides(tmp_path), "augment=light", *overrides)
    pl.seed_everything(0)
    datamodule, module = build(cfg)
    before = snapshot(module.net)
    freeze = FreezeStages(**{k: v for k, v in cfg.freeze.items() if k != "_target_"})
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[freeze])
    trainer.fit(module, datamodule=datamodule)
    return module, trainer, before


def test_all_but_head_trains_only_the_softmax_layer(compose, tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised"):
        module, trainer, before = fit_frozen(compose, tmp_path, "freeze=all_but_head")
    assert changed(before, module.net) == {"head.fc.weight", "head.fc.bias"}  # BN running stats included
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in module.net.head.fc.parameters()}
    counts = module.parameter_counts()
    assert counts["params_trainable"] == sum(p.numel() for p in module.net.head.fc.parameters()) < counts["params_total"]


def test_stages_k_freezes_the_stem_and_first_k_stages_only(compose, tmp_path):
    module, _, before = fit_frozen(compose, tmp_path, "freeze=stages", "freeze.depth=2")
    moved = changed(before, module.net)
    assert not {n for n in moved if n.startswith(("stem.", "stages.0.", "stages.1."))}
    assert any(n.startswith("stages.2.") and "running_mean" in n for n in moved)  # unfrozen BN still learns
    assert {"head.fc.weight", "head.fc.bias"} <= moved


def test_frozen_batchnorm_uses_running_statistics_in_evaluation(compose, tmp_path):
    module, _, _ = fit_frozen(compose, tmp_path, "freeze=all_but_head")
    norm = module.net.stem[0][1]
    assert norm.track_running_stats  # Lightning's freeze would have turned this off
    module.eval()
    x = torch.randn(4, 32, 8, 8) * 5 + 3
    expected = (x - norm.running_mean[None, :, None, None]) / torch.sqrt(norm.running_var[None, :, None, None] + norm.eps)
    expected = expected * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    assert torch.allclose(norm(x), expected, atol=1e-4)


def test_freeze_none_trains_everything(compose, tmp_path):
    module, trainer, before = fit_frozen(compose, tmp_path, "freeze=none")
    counts = module.parameter_counts()
    assert counts["params_trainable"] == counts["params_total"]
    assert {n for n in before if n.startswith("stem.") and before[n].is_floating_point()} <= changed(before, module.net)


def test_invalid_depth_is_a_config_error(compose, tmp_path):
    with pytest.raises(ConfigError, match="between 0 and 3"):
        fit_frozen(compose, tmp_path, "freeze=stages", "freeze.depth=4")
    with pytest.raises(ConfigError, match="0 or more"):
        FreezeStages(depth=-1)
