"""Decoding an image folder in several processes gives the cache that one process gives, byte for byte.

The images are the real photographs of test_real_images.py (random crops of three photos, the photos
themselves), each copied a few times under other names so that there are enough files for several
processes and several tasks each.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import cnnlab.data.imagefolder as imagefolder
from cnnlab.data import ImageFolderSource
from cnnlab.data.cache import SPLITS
from cnnlab.data.imagefolder import load_rgb
from cnnlab.errors import ConfigError
from conftest import CONF_DIR
from test_real_images import add_unreadable_files, build, crops  # noqa: F401 (crops is a fixture)

SIZE = 32
COPIES = 3  # each photo file under three names: 3 classes x 31 files x 3 = 279 files


def many_images(root: Path, crops) -> Path:  # noqa: F811
    """root/{train,test}/<class>/: every crop and photo COPIES times, under distinct names."""
    build(root, crops, {"train": 24, "test": 7})
    for class_dir in [d for split in ("train", "test") for d in (root / split).iterdir()]:
        for path in sorted(class_dir.iterdir()):
            for copy in range(1, COPIES):
                shutil.copyfile(path, class_dir / f"copy{copy}_{path.name}")
    return root


def cache_files(cache) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(cache.dir.iterdir())}


@pytest.fixture
def pools(monkeypatch) -> list[int]:
    """The number of processes of each process pool the ingest starts."""
    started = []
    real = imagefolder.ProcessPoolExecutor

    def counting(max_workers, **kwargs):
        started.append(max_workers)
        return real(max_workers, **kwargs)

    monkeypatch.setattr(imagefolder, "ProcessPoolExecutor", counting)
    return started


def prepare(root: Path, cache_root: Path, workers: int, **settings):
    return ImageFolderSource(root, cache_root, stored_size=SIZE, val_fraction=0.2, seed=5, workers=workers,
                             **settings).prepare()


def test_two_processes_give_the_cache_of_one_byte_for_byte_on_real_photographs(tmp_path, crops, pools):  # noqa: F811
    root = many_images(tmp_path / "images", crops)
    one = prepare(root, tmp_path / "one", workers=1)
    assert pools == []  # one worker: decoded in this process, as before
    two = prepare(root, tmp_path / "two", workers=2)
    assert pools == [2]
    assert one.dir.name == two.dir.name  # the worker count is not part of the cache's key
    assert cache_files(one) == cache_files(two)  # every array, labels and meta.json (manifest, hashes) alike
    files = {f["file"]: f for f in one.meta["files"]}
    assert len(files) == 3 * 31 * COPIES
    for split in SPLITS:  # the arrays are what np.save gives for the files decoded one by one, in file order
        names = [f["file"] for f in one.meta["files"] if f["split"] == split]
        expected = np.stack([load_rgb(root / name, SIZE) for name in names])
        np.save(tmp_path / "expected.npy", expected)
        assert (one.dir / f"{split}_images.npy").read_bytes() == (tmp_path / "expected.npy").read_bytes()
        assert [one.classes[label] for label in one.split(split).labels] == [files[n]["class"] for n in names]
    assert [len(one.split(split).labels) for split in SPLITS] == [174, 42, 63]


def test_unreadable_files_are_skipped_and_listed_the_same_way_whatever_the_worker_count(tmp_path, crops):  # noqa: F811
    root = many_images(tmp_path / "images", crops)
    bad = add_unreadable_files(root / "train" / "china", 3) + add_unreadable_files(root / "test" / "hopper", 2)
    (root / "train" / "flower" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    one = prepare(root, tmp_path / "one", workers=1, skip_bad_images=True)
    two = prepare(root, tmp_path / "two", workers=2, skip_bad_images=True)
    assert cache_files(one) == cache_files(two)
    skipped = [entry["file"] for entry in one.meta["skipped"]]
    assert sorted(skipped) == sorted([f"train/china/{name}" for name in bad[:3]] + ["train/flower/truncated.png"]
                                     + [f"test/hopper/{name}" for name in bad[3:]])
    assert skipped == sorted(skipped, key=lambda f: (not f.startswith("train/"), f))  # in file order
    kept = [f["file"] for f in one.meta["files"]]
    assert not set(kept) & set(skipped) and len(kept) == 3 * 31 * COPIES
    # the carved splits are drawn from the kept images only, as they were before decoding went parallel
    train = [f for f in one.meta["files"] if f["file"].startswith("train/")]
    labels = np.array([one.classes.index(f["class"]) for f in train])
    expected = imagefolder.stratified_split(labels, 0.2, 0.0, seed=5)
    assert [f["split"] for f in train] == expected.tolist()
    for split in SPLITS:
        names = [f["file"] for f in one.meta["files"] if f["split"] == split]
        np.testing.assert_array_equal(one.split(split).images, np.stack([load_rgb(root / n, SIZE) for n in names]))
    assert [p.name for p in one.dir.parent.iterdir()] == [one.dir.name]  # no temporary folder left


def test_unreadable_files_stop_the_ingest_with_the_same_one_line_and_leave_nothing(tmp_path, crops):  # noqa: F811
    root = many_images(tmp_path / "images", crops)
    add_unreadable_files(root / "test" / "flower", 2)
    messages = []
    for workers in (1, 2):
        with pytest.raises(ConfigError) as error:
            prepare(root, tmp_path / f"cache{workers}", workers=workers)
        messages.append(str(error.value))
        assert list((tmp_path / f"cache{workers}").iterdir()) == []  # the temporary folder is removed
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"2 unreadable image(s) under {root}: test/flower/broken_0.jpg (")


def test_an_unchanged_folder_is_not_decoded_again_with_another_worker_count(tmp_path, crops, monkeypatch):  # noqa: F811
    root = many_images(tmp_path / "images", crops)
    first = prepare(root, tmp_path / "cache", workers=2)
    monkeypatch.setattr(imagefolder, "decode_all", lambda *args, **kwargs: pytest.fail("decoded again"))
    assert prepare(root, tmp_path / "cache", workers=1).dir == first.dir


@pytest.mark.slow
def test_the_decoding_processes_can_be_spawned(tmp_path, crops, monkeypatch, pools):  # noqa: F811
    """spawn (macOS, Windows) starts a fresh interpreter: the task must be importable and picklable."""
    root = many_images(tmp_path / "images", crops)
    one = prepare(root, tmp_path / "one", workers=1)
    monkeypatch.setattr(imagefolder, "START_METHOD", "spawn")
    spawned = prepare(root, tmp_path / "spawned", workers=2)
    assert pools == [2]
    assert cache_files(one) == cache_files(spawned)


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True])
def test_a_bad_worker_count_is_refused_in_one_line(tmp_path, workers):
    with pytest.raises(ConfigError, match=r"^workers must be an integer >= 1 \(1: decode in this process\), or null"):
        ImageFolderSource(tmp_path, tmp_path / "cache", workers=workers)


def test_the_default_is_one_process_per_core_at_most_16(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefolder.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert ImageFolderSource(tmp_path, tmp_path / "cache").workers == 16
    monkeypatch.setattr(imagefolder.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert ImageFolderSource(tmp_path, tmp_path / "cache", workers=None).workers == 2
    assert ImageFolderSource(tmp_path, tmp_path / "cache", workers=5).workers == 5


def test_the_config_has_the_worker_knob_and_leaves_it_to_the_cores(tmp_path):
    source = OmegaConf.load(CONF_DIR / "data" / "imagefolder.yaml").source
    assert source.workers is None
    source.root, source.cache_root = str(tmp_path), str(tmp_path / "cache")
    assert instantiate(source).workers == imagefolder.default_workers()
    source.workers = 3
    assert instantiate(source).workers == 3


def test_a_grayscale_and_a_16_bit_png_decode_alike_in_a_decoding_process(tmp_path):
    """Every mode goes through the one function: a few odd files among many, decoded by two processes."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(80):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        if i % 10 == 3:
            Image.fromarray(rng.integers(0, 65535, (50, 40), dtype=np.uint16)).save(folder / f"{i}.png")
        elif i % 10 == 7:
            Image.fromarray(rng.integers(0, 255, (30, 60), dtype=np.uint8), "L").save(folder / f"{i}.png")
        else:
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    one = prepare(root, tmp_path / "one", workers=1)
    two = prepare(root, tmp_path / "two", workers=2)
    assert cache_files(one) == cache_files(two)
