"""Epoch time of ``freeze=all_but_head`` with and without cached trunk features.

    python benchmarks/cached_features.py [--models efficientnet_b0 resnet50] [--size 128] [--images 512] [--epochs 3]

For each model, trains only the softmax layer on the generated shapes data at ``--size`` px,
side by side in this one run: (a) on images, every epoch through the frozen trunk
(``freeze.cache_features=false``), (b) on cached features, where the first epoch also computes
the cache. Reports each epoch's wall time (training + validation) and the ratio of the mean
epoch time after the first. The trunk starts from a saved random initialisation (the time
does not depend on the weights); a fresh feature cache is made in a temporary folder.
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cnnlab.training.features import train_on_cached_features
from cnnlab.training.run import build

CONF = Path(__file__).resolve().parents[1] / "conf"


class EpochTimer(pl.Callback):
    def __init__(self):
        self.times, self._start = [], 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):  # an epoch = its training and its validation
        if not trainer.sanity_checking:
            self.times.append(time.perf_counter() - self._start)


def epoch_times(root: Path, model: str, size: int, images: int, epochs: int, cached: bool) -> list[float]:
    overrides = [f"paths.root_dir={root}", f"model={model}", f"data.source.image_size={size}",
                 f"data.source.train_size={images}", f"data.source.val_size={images // 4}", "data.source.test_size=16",
                 "data.batch_size=64", f"model.pretrained={root / f'{model}.pt'}", "freeze=all_but_head",
                 f"freeze.cache_features={cached}", "logger=none"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    pl.seed_everything(0)
    datamodule, module = build(cfg)
    freeze = instantiate(cfg.freeze)
    if cached:
        datamodule = train_on_cached_features(datamodule, module, root / "features")
    timer = EpochTimer()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[freeze, timer])
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    if cached:  # the feature extraction runs before the first epoch: count it in that epoch
        timer.times[0] += (time.perf_counter() - start) - sum(timer.times)
    return timer.times


def save_start_weights(root: Path, model: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root_dir={root}", f"model={model}", "data.source.train_size=16",
                                           "data.source.val_size=16", "data.source.test_size=16"])
    _, module = build(cfg)
    torch.save(module.net.state_dict(), root / f"{model}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "resnet50"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; {args.images} training + {args.images // 4} validation images "
          f"at {args.size} px, {args.epochs} epochs\n")
    print("| model | images: s/epoch | cached: first epoch (with extraction) | cached: s/epoch after | speed-up after the first |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for model in args.models:
            save_start_weights(root, model)
            uncached = epoch_times(root, model, args.size, args.images, args.epochs, cached=False)
            cached = epoch_times(root, model, args.size, args.images, args.epochs, cached=True)
            image_epoch = sum(uncached) / len(uncached)
            cached_epoch = sum(cached[1:]) / len(cached[1:])
            print(f"| {model} | {image_epoch:.2f} | {cached[0]:.2f} | {cached_epoch:.3f} | "
                  f"{image_epoch / cached_epoch:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
