"""CIFAR-10 from a tarball in the official format, made by the test (the network path is not tested)."""

import io
import pickle
import tarfile

import numpy as np
import pytest

from cnnlab.data import Cifar10Source
from cnnlab.data.cifar10 import md5sum, verify_md5
from cnnlab.errors import ConfigError

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def batch(rng, n):
    labels = [i % 10 for i in range(n)]
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, :1024] = np.array(labels, np.uint8)[:, None] * 20  # red plane encodes the label
    return {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"f"] * n}


def make_tarball(path, per_batch=20, test=30):
    rng = np.random.default_rng(0)
    members = {f"data_batch_{i}": batch(rng, per_batch) for i in range(1, 6)}
    members["test_batch"] = batch(rng, test)
    members["batches.meta"] = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch}
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            payload = pickle.dumps(content)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def test_tarball_becomes_train_val_test_with_images_the_right_way_round(tmp_path):
    archive = make_tarball(tmp_path / "cifar-10-python.tar.gz")
    cache = Cifar10Source(archive, tmp_path / "cache", val_size=20, download=False).prepare()
    assert cache.classes == CLASSES
    train, val, test = (cache.split(s) for s in ("train", "val", "test"))
    assert (len(train.labels), len(val.labels), len(test.labels)) == (80, 20, 30)
    assert np.bincount(val.labels).tolist() == [2] * 10  # held out per class
    assert train.images.shape[1:] == (32, 32, 3)
    assert np.array_equal(train.images[:, :, :, 0].max(axis=(1, 2)), train.labels * 20)  # red plane -> channel 0
    assert Cifar10Source(archive, tmp_path / "cache", val_size=20, download=False).prepare().dir == cache.dir


def test_missing_tarball_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="CIFAR-10 tarball not found: .*absent.tar.gz"):
        Cifar10Source(tmp_path / "absent.tar.gz", tmp_path / "cache", download=False).prepare()


def test_a_file_with_the_wrong_md5_is_refused_and_removed(tmp_path):
    archive = make_tarball(tmp_path / "cifar.tar.gz")
    verify_md5(archive, md5sum(archive))  # the right sum passes
    with pytest.raises(ConfigError, match="MD5"):
        verify_md5(archive, "0" * 32)
    assert not archive.exists()


def test_a_different_tarball_is_refused(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("something/else")
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(ConfigError, match="not the CIFAR-10 python tarball"):
        Cifar10Source(path, tmp_path / "cache", download=False).prepare()


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file when unpickled


def test_a_tarball_whose_pickles_would_run_code_is_refused_and_nothing_runs(tmp_path):
    """A tarball put at data.source.archive by hand is not MD5-checked: its pickles must not run anything."""
    archive = make_tarball(tmp_path / "cifar-10-python.tar.gz")
    marker = tmp_path / "code-ran"
    with tarfile.open(archive, "r:gz") as original:
        members = {m.name: original.extractfile(m).read() for m in original.getmembers()}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": RunsCode(marker)})
    with tarfile.open(archive, "w:gz") as crafted:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            crafted.addfile(info, io.BytesIO(payload))
    with pytest.raises(ConfigError, match=r"its batches.meta would import io.open \(refused; nothing"):
        Cifar10Source(archive, tmp_path / "cache", download=False).prepare()
    assert not marker.exists() and not list((tmp_path / "cache").glob("cifar10-*"))


@pytest.mark.slow
def test_train_on_cifar10_from_a_tarball(tmp_path):
    from conftest import run_script

    archive = make_tarball(tmp_path / "cifar-10-python.tar.gz")
    result = run_script("train.py", "data=cifar10", f"data.source.archive={archive}", "data.source.download=false",
                        "data.source.val_size=20", f"paths.root_dir={tmp_path}", "data.batch_size=16",
                        "data.num_workers=0", "trainer.max_epochs=1", "logger=none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test accuracy" in result.stdout
