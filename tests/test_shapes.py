"""The generated shapes dataset and the prepared-data cache."""

import numpy as np
import pytest

from cnnlab.data import ShapesSource
from cnnlab.errors import ConfigError
from cnnlab.data.cache import ImageCache
from cnnlab.data.shapes import SHAPES, generate_split

BASE = ["circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "ring", "crescent", "arrow"]


def test_same_seed_same_bytes_other_seed_other_images():
    a_images, a_labels = generate_split(40, BASE, 32, seed=7)
    b_images, b_labels = generate_split(40, BASE, 32, seed=7)
    c_images, _ = generate_split(40, BASE, 32, seed=8)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)


@pytest.mark.parametrize("size", [32, 48])
def test_split_is_balanced_rgb_uint8_at_the_requested_size(size):
    images, labels = generate_split(80, BASE[:8], size, seed=0)
    assert images.shape == (80, size, size, 3) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=8).tolist() == [10] * 8
    assert images.std() > 20  # textured, not blank


def test_images_of_one_class_vary_in_position_colour_and_background():
    images, labels = generate_split(60, BASE[:3], 32, seed=1)
    circles = images[labels == 0].astype(float)
    assert circles.std(axis=0).mean() > 30


def test_at_least_eight_classes_and_bad_class_lists_are_refused():
    assert len(SHAPES) >= 8
    for classes in (["circle", "blob"], ["circle"], ["circle", "circle"]):
        with pytest.raises(ConfigError, match="data.source.classes"):
            ShapesSource("unused", classes)


def test_fewshot_classes_are_new_shapes(compose):
    base = compose("data=shapes").data.source.classes
    fewshot = compose("data=shapes_fewshot").data.source
    assert not set(base) & set(fewshot.classes) and len(fewshot.classes) >= 5
    assert 10 <= fewshot.train_size // len(fewshot.classes) <= 30


def test_prepare_writes_the_cache_once_and_reads_it_back(tmp_path):
    source = ShapesSource(tmp_path, BASE[:4], train_size=20, val_size=8, test_size=8)
    cache = source.prepare()
    stamp = (cache.dir / "train_images.npy").stat().st_mtime_ns
    again = ShapesSource(tmp_path, BASE[:4], train_size=20, val_size=8, test_size=8).prepare()
    assert again.dir == cache.dir
    assert (cache.dir / "train_images.npy").stat().st_mtime_ns == stamp  # not regenerated
    assert cache.classes == BASE[:4]
    train = ImageCache(cache.dir).split("train")
    assert isinstance(train.images, np.memmap) and train.images.shape == (20, 32, 32, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.dir.name]  # no temporary folders left


def test_changing_one_split_size_leaves_the_others_unchanged(tmp_path):
    small = ShapesSource(tmp_path, BASE[:4], train_size=20, val_size=8, test_size=8).prepare()
    large = ShapesSource(tmp_path, BASE[:4], train_size=40, val_size=8, test_size=8).prepare()
    assert small.dir != large.dir
    assert np.array_equal(small.split("test").images, large.split("test").images)


def test_prepare_script_builds_the_configured_cache_once(tmp_path):
    from conftest import run_script, tiny_overrides

    first = run_script("prepare.py", *tiny_overrides(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    (cache_dir,) = (tmp_path / "data").iterdir()
    assert f"{cache_dir.name}: 10 classes (circle, triangle," in first.stdout
    assert "train 64, val 32, test 32 images" in first.stdout
    stamp = (cache_dir / "train_images.npy").stat().st_mtime_ns
    second = run_script("prepare.py", *tiny_overrides(tmp_path))
    assert second.returncode == 0 and "Generating" not in second.stderr
    assert (cache_dir / "train_images.npy").stat().st_mtime_ns == stamp

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert len(runs) == 2  # both runs name the one cache as their dataset (the Dataset column)
    for run in runs:
        [used] = run.inputs.dataset_inputs
        assert (used.dataset.name, used.dataset.digest) == ("shapes", cache_dir.name.removeprefix("shapes-"))
        assert [(tag.key, tag.value) for tag in used.tags] == [("mlflow.data.context", "preparation")]
