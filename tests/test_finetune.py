"""Freezing: what stays frozen really stays, BatchNorm statistics included, and what trains does."""

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

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
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[instantiate(cfg.freeze)])
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


def optimizer_state(trainer):
    """Per param group: its parameters' names, current and base learning rate, weight decay."""
    names = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["initial_lr"], g["weight_decay"])
            for g in trainer.optimizers[0].param_groups]


def gradual_trainer(max_epochs, **kwargs):
    from cnnlab.training.finetune import GradualUnfreeze
    return pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=[GradualUnfreeze(unfreeze_at=[1, 2], backbone_lr_factor=0.1), *kwargs.pop("extra", [])],
                      **kwargs)


def test_gradual_unfreezes_from_the_top_at_a_lower_learning_rate(compose, tmp_path):
    cfg = compose(*tiny_overrides(tmp_path), "freeze=gradual", "freeze.unfreeze_at=[1,2]", "scheduler=cosine")
    pl.seed_everything(0)
    datamodule, module = build(cfg)
    before = snapshot(module.net)
    trainer = gradual_trainer(3, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="randomly initialised"):
        trainer.fit(module, datamodule=datamodule)
    moved = changed(before, module.net)
    assert {n.split(".")[1] for n in moved if n.startswith("stages.")} == {"1", "2"}  # the top two of three
    assert not {n for n in moved if n.startswith(("stem.", "stages.0."))}
    groups = optimizer_state(trainer)
    assert len(groups) == 2 + 2 + 2  # head, then the last stage, then the one before, each with and without decay
    head_lr, head_base = groups[0][1], groups[0][2]
    assert all(name.startswith("net.stages.2.") for name in groups[2][0] + groups[3][0])
    assert all(name.startswith("net.stages.1.") for name in groups[4][0] + groups[5][0])
    for _, lr, base, _ in groups[2:]:  # the backbone follows the head's schedule at a tenth of its rate
        assert base == pytest.approx(0.1 * head_base) and lr == pytest.approx(0.1 * head_lr)
    assert [g[3] for g in groups] == [cfg.optimizer.weight_decay, 0.0] * 3
    assert len(trainer.lr_scheduler_configs[0].scheduler.lr_lambdas) == len(groups)


class StopAfter(pl.Callback):
    """Ends the run after ``epochs`` epochs, as a crash or a cancelled job would (the schedule keeps its length)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["cosine", "one_cycle"])
def test_gradual_resumes_with_its_param_groups_and_schedule(compose, tmp_path, scheduler):
    """Stopped after epoch 2 (one stage unfrozen) and resumed: the same state as a run that never stopped."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    cfg = compose(*tiny_overrides(tmp_path), "freeze=gradual", f"scheduler={scheduler}")

    def fit(*extra, ckpt_path=None):
        pl.seed_everything(0)
        datamodule, module = build(cfg)
        trainer = gradual_trainer(3, extra=list(extra), enable_checkpointing=True, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return trainer

    with pytest.warns(UserWarning):
        straight = fit()
        stopped = fit(StopAfter(2), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
        assert stopped.current_epoch == 2 and len(optimizer_state(stopped)) == 4  # head + the last stage
        resumed = fit(ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.global_step == straight.global_step == 3 * 64 // 16
    assert len(optimizer_state(resumed)) == 6
    for (names_r, lr_r, base_r, wd_r), (names_s, lr_s, base_s, wd_s) in zip(optimizer_state(resumed),
                                                                             optimizer_state(straight), strict=True):
        assert names_r == names_s and wd_r == wd_s
        assert lr_r == pytest.approx(lr_s) and base_r == pytest.approx(base_s)
    trainable = {n for n, p in resumed.lightning_module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in straight.lightning_module.named_parameters() if p.requires_grad}


class ChangedAfterFirstEpoch(pl.Callback):
    def __init__(self, before):
        self.before, self.moved = before, None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.moved = changed(self.before, pl_module.net)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vgg11_bn", "resnet18", "plain18", "googlenet", "inception_v1", "mobilenet_v1",
                                   "mobilenet_v2", "efficientnet_b0"])
def test_every_family_freezes_and_unfreezes_by_the_same_contract(compose, tmp_path, model):
    from cnnlab.training.finetune import trunk

    def fit(*overrides, epochs):
        aux = ["model.aux_heads=true"] if model == "googlenet" else []  # its side classifiers freeze with the trunk
        cfg = compose(*tiny_overrides(tmp_path), f"model={model}", "data.source.train_size=16", "data.batch_size=8",
                      *aux, *overrides)
        pl.seed_everything(0)
        datamodule, module = build(cfg)
        before = snapshot(module.net)
        probe = ChangedAfterFirstEpoch(before)
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=1, limit_val_batches=0,
                             num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[instantiate(cfg.freeze), probe])
        with pytest.warns(UserWarning, match="randomly initialised"):
            trainer.fit(module, datamodule=datamodule)
        return module.net, probe.moved, changed(before, module.net)

    net, first_epoch, moved = fit("freeze=gradual", "freeze.unfreeze_at=[1]", epochs=2)
    assert first_epoch == {"head.fc.weight", "head.fc.bias"}  # all_but_head: the softmax layer only
    top = next(name for name, m in net.named_modules() if m is trunk(net)[-1])
    assert any(n.startswith(f"{top}.") for n in moved)  # then the top of the trunk trains
    assert not {n for n in moved if n.startswith(("stem.", "stages.0."))}

    _, _, moved = fit("freeze=stages", "freeze.depth=1", epochs=1)
    assert not {n for n in moved if n.startswith(("stem.", "stages.0."))}
    assert any(n.startswith(f"stages.{len(net.stages) - 1}.") for n in moved)
