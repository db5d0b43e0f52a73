"""Cached features for a frozen trunk: the same model as the image path, computed once."""

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from cnnlab.data.augment import eval_transform
from cnnlab.data.datamodule import CachedImageDataset
from cnnlab.errors import ConfigError
from cnnlab.training.features import train_on_cached_features
from cnnlab.training.finetune import FreezeStages
from cnnlab.training.run import build
from conftest import tiny_overrides


@pytest.fixture
def start_weights(compose, tmp_path):
    """A trunk to start from (random, but saved: the run is a fine-tuning from a file)."""
    pl.seed_everything(1)
    _, module = build(compose(*tiny_overrides(tmp_path)))
    path = tmp_path / "start.pt"
    torch.save(module.net.state_dict(), path)
    return path


def fit_head(compose, tmp_path, start_weights, *overrides):
    cfg = compose(*tiny_overrides(tmp_path), f"model.pretrained={start_weights}", "freeze=all_but_head",
                  "trainer.max_epochs=3", *overrides)
    pl.seed_everything(0)
    datamodule, module = build(cfg)
    freeze = instantiate(cfg.freeze)
    if freeze.cache_features:
        datamodule = train_on_cached_features(datamodule, module, tmp_path / "features")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=cfg.trainer.max_epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[freeze])
    trainer.fit(module, datamodule=datamodule)
    return module, datamodule, trainer.test(module, datamodule=datamodule, verbose=False)[0]


def test_cached_features_train_the_same_head_as_images(compose, tmp_path, start_weights):
    cached, features, cached_results = fit_head(compose, tmp_path, start_weights)
    assert cached.trains_on_features and features.dir.parent == tmp_path / "features"
    uncached, _, uncached_results = fit_head(compose, tmp_path, start_weights, "freeze.cache_features=false")
    assert not uncached.trains_on_features
    # the trunk never moved in either run, so both heads learned from the same inputs
    for (name, a), b in zip(cached.net.state_dict().items(), uncached.net.state_dict().values()):
        if not name.startswith("head.fc"):
            assert torch.equal(a, b), name
    assert abs(cached_results["test/acc"] - uncached_results["test/acc"]) <= 0.1  # same accuracy within noise
    assert abs(cached_results["test/loss"] - uncached_results["test/loss"]) <= 0.1

    # the trained model on images gives exactly the logits its head gives on the cached features
    test_images = CachedImageDataset(features.images.cache.split("test"), eval_transform(32))
    images = torch.stack([test_images[i][0] for i in range(len(test_images))])
    cached.eval()
    with torch.inference_mode():
        from_images = cached(images)
        from_cache = cached.net.head.classify(features.datasets["test"].tensors[0])
    torch.testing.assert_close(from_images, from_cache, atol=1e-5, rtol=1e-5)


def test_the_cache_is_reused_and_keyed_by_the_weights(compose, tmp_path, start_weights):
    _, first, _ = fit_head(compose, tmp_path, start_weights, "trainer.max_epochs=1")
    stamp = (first.dir / "train_features.npy").stat().st_mtime_ns
    _, again, _ = fit_head(compose, tmp_path, start_weights, "trainer.max_epochs=1")
    assert again.dir == first.dir and (again.dir / "train_features.npy").stat().st_mtime_ns == stamp

    weights = torch.load(start_weights)
    weights["stem.0.0.weight"] += 0.01  # another trunk: other features
    other = tmp_path / "other.pt"
    torch.save(weights, other)
    _, changed, _ = fit_head(compose, tmp_path, other, "trainer.max_epochs=1")
    _, resized, _ = fit_head(compose, tmp_path, start_weights, "trainer.max_epochs=1", "data.image_size=40")
    assert len({first.dir, changed.dir, resized.dir}) == 3


def test_augmentation_is_off_with_cached_features_and_says_so(compose, tmp_path, start_weights, caplog):
    with caplog.at_level("INFO"):
        fit_head(compose, tmp_path, start_weights, "trainer.max_epochs=1", "augment=light")
    assert "augmentation (mirror, crop) is off" in caplog.text


def test_cached_features_need_the_whole_trunk_frozen():
    with pytest.raises(ConfigError, match="freeze=all_but_head"):
        FreezeStages(depth=2, cache_features=True)
