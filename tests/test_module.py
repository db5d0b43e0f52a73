"""The LightningModule and data module on tiny data: real short trainings, no logger."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from cnnlab.data.cache import CachedSplit
from cnnlab.data.datamodule import CachedImageDataset, batches
from cnnlab.models import Net
from cnnlab.training.run import build as build_run
from conftest import tiny_overrides


def build(cfg):
    pl.seed_everything(cfg.seed, workers=True)
    return build_run(cfg)


def fit(module, datamodule, **trainer_args):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **trainer_args)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def test_default_model_follows_the_contract(compose, tmp_path):
    _, module = build(compose(*tiny_overrides(tmp_path)))
    net = module.net
    assert isinstance(net, Net) and len(net.stages) == 3
    features = net.forward_features(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, 128, 8, 8)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_width_and_depth_multipliers_scale_the_stage_table(compose, tmp_path):
    _, base = build(compose(*tiny_overrides(tmp_path)))
    _, scaled = build(compose(*tiny_overrides(tmp_path), "scaling.width=1.5", "scaling.depth=2"))
    assert [len(s) for s in scaled.net.stages] == [2, 2, 2]
    assert scaled.net.head.fc.in_features == 192
    assert scaled.parameter_counts()["params_total"] > 2 * base.parameter_counts()["params_total"]


def test_batches_are_uint8_and_the_module_normalises(compose, tmp_path):
    datamodule, module = build(compose(*tiny_overrides(tmp_path)))
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.max() < 10
    normalised = (images.float() - module.mean) / module.std
    assert abs(normalised.mean().item()) < 1.5


def test_augmentation_is_reproducible_across_worker_processes(compose, tmp_path):
    def first_batches(seed):
        cfg = compose(*tiny_overrides(tmp_path), "augment=light", "data.num_workers=2", f"seed={seed}")
        datamodule, _ = build(cfg)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        return [images.clone() for images, _ in loader]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_distortions_differ_per_image_and_epoch_and_not_with_the_worker_count(compose, tmp_path):
    datamodule, _ = build(compose(*tiny_overrides(tmp_path), "augment=light"))
    datamodule.setup("fit")
    train = datamodule.datasets["train"]
    same_image = CachedSplit(images=np.repeat(train.images[:1], 6, axis=0), labels=train.labels[:6])

    def epochs(workers: int) -> list[list[torch.Tensor]]:
        copies = CachedImageDataset(same_image, train.transform, augments=True)
        loader = batches(copies, 2, shuffle=True, num_workers=workers, seed=3)
        return [[image for images, _ in loader for image in images] for _ in range(2)]

    first, second = epochs(0)
    distinct = {image.numpy().tobytes() for image in first + second}  # six copies, two epochs
    assert len(distinct) >= 10  # (a 32 px image has few crop boxes: two draws can coincide)
    for workers in (1, 3):
        assert all(torch.equal(a, b) for a, b in zip(first + second, sum(epochs(workers), [])))


def test_optimizer_holds_only_trainable_parameters_without_decay_on_norms(compose, tmp_path):
    datamodule, module = build(compose(*tiny_overrides(tmp_path), "optimizer=sgd", "scheduler=none"))
    for p in module.net.stem.parameters():
        p.requires_grad_(False)
    optimizer = module.configure_optimizers()
    decayed, not_decayed = optimizer.param_groups
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters() if p.requires_grad}
    assert decayed["weight_decay"] == 5e-4 and all(p.ndim > 1 for p in decayed["params"])
    assert not_decayed["weight_decay"] == 0 and all(p.ndim == 1 for p in not_decayed["params"])


def test_sgd_with_cosine_learns_and_anneals(compose, tmp_path):
    cfg = compose(*tiny_overrides(tmp_path), "optimizer=sgd", "scheduler=cosine", "trainer.max_epochs=3")
    datamodule, module = build(cfg)
    trainer = fit(module, datamodule, max_epochs=3)
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] < 0.01 * cfg.optimizer.lr  # decayed to near zero at the end
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert {"train/acc", "train/f1", "train/acc_top5", "val/acc", "val/loss"} <= set(trainer.callback_metrics)


def test_adamw_with_one_cycle_warms_up_then_decays(compose, tmp_path):
    cfg = compose(*tiny_overrides(tmp_path), "optimizer=adamw", "scheduler=one_cycle")
    datamodule, module = build(cfg)
    lrs = []

    class RecordLr(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(module, datamodule, max_epochs=2, callbacks=[RecordLr()])
    peak = int(np.argmax(lrs))
    assert 0 < peak < len(lrs) - 1
    assert math.isclose(max(lrs), cfg.optimizer.lr, rel_tol=0.05)


def test_label_smoothing_raises_the_loss_of_confident_predictions(compose, tmp_path):
    _, plain = build(compose(*tiny_overrides(tmp_path)))
    _, smoothed = build(compose(*tiny_overrides(tmp_path), "label_smoothing=0.1"))
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    assert smoothed.criterion(logits, labels) > plain.criterion(logits, labels) + 0.1


def test_top5_only_with_five_or_more_classes(compose, tmp_path):
    _, module = build(compose(*tiny_overrides(tmp_path), "data.source.classes=[circle,triangle,square,star]"))
    assert "test/acc_top5" not in module.test_metrics.keys(keep_base=False) and len(module.classes) == 4


def test_training_batches_keep_every_image_but_a_lone_last_one(compose, tmp_path):
    for train_size, seen in [(70, 70), (65, 64)]:  # batches of 16: 70 = 4x16 + 6; 65 = 4x16 + 1
        datamodule, _ = build(compose(*tiny_overrides(tmp_path), f"data.source.train_size={train_size}"))
        datamodule.setup("fit")
        assert sum(len(labels) for _, labels in datamodule.train_dataloader()) == seen


@pytest.mark.timeout(120)
def test_workers_forked_after_heavy_opencv_use_do_not_hang(compose, tmp_path):
    import cv2

    assert cv2.getNumThreads() == 1  # no OpenCV thread pool in any process (see cnnlab.data.augment)
    cv2.resize(np.zeros((4000, 4000, 3), np.uint8), (1000, 1000))  # would start a pool if there were one
    datamodule, _ = build(compose(*tiny_overrides(tmp_path), "augment=heavy", "data.num_workers=2"))
    datamodule.setup("fit")
    assert sum(len(labels) for _, labels in datamodule.train_dataloader()) == 64


def test_the_module_takes_uint8_pixels_and_refuses_floats(compose, tmp_path):
    _, module = build(compose(*tiny_overrides(tmp_path)))
    module.eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    normalised = (pixels.float() - module.mean) / module.std
    assert torch.allclose(module(pixels), module.net(normalised))
    with pytest.raises(TypeError, match="uint8"):
        module(pixels.float() / 255)


def test_one_cycle_fits_a_run_of_a_few_steps_and_refuses_fewer_than_three():
    from cnnlab.errors import ConfigError
    from cnnlab.training.schedules import one_cycle

    for steps in (3, 4, 7):  # torch's OneCycleLR divided by zero for pct_start x steps <= 1
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
        schedule = one_cycle(optimizer, total_steps=steps)
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert max(rates) == pytest.approx(0.05) and rates[0] < 0.05 and rates[-1] < 0.05
    with pytest.raises(ConfigError, match="one_cycle needs 3 optimizer steps"):
        one_cycle(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05), total_steps=2)


def test_the_learning_rate_is_one_metric_per_distinct_rate(tmp_path):
    """Four param groups at two rates (the weight-decay split, and layers unfrozen at a tenth): `lr` and
    `lr/1`, not one chart per group, written by a real Lightning logger at each epoch's start."""
    import csv

    from pytorch_lightning.loggers import CSVLogger

    from cnnlab.training.callbacks import LearningRates

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))

        def training_step(self, batch, batch_idx):
            x = batch[0]
            for layer in self.layers:
                x = layer(x)
            return x.square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD([{"params": layer.parameters(), "lr": rate}
                                    for layer, rate in zip(self.layers, (0.1, 0.1, 0.01, 0.01))])

    data = DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=CSVLogger(tmp_path), callbacks=[LearningRates()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), data)
    with open(next(tmp_path.rglob("metrics.csv")), newline="") as file:
        rows = list(csv.DictReader(file))
    assert [key for key in rows[0] if key.startswith("lr")] == ["lr", "lr/1"]
    rates = [(float(row["lr"]), float(row["lr/1"]), int(row["step"])) for row in rows]
    assert rates == [(0.1, 0.01, 0), (0.1, 0.01, 2)]
