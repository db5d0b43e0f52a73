"""Two processes preparing the same new dataset at once give one valid cache, decoded once.

Each test first holds the cache's lock itself, as a third process that is preparing would, until both
processes under test wait for it: then they surely contend (started together, one could otherwise
finish before the other looks). Once it lets go, one of them must prepare and the other wait and use
its cache; meanwhile the test watches the cache's folder, which must never be seen incomplete. The
cache must be the one a process preparing alone writes, byte for byte, and nothing else may be left
beside it (no temporary folder, no lock file).
"""

import hashlib
import http.server
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from hydra.utils import instantiate

from cnnlab.data import Cifar10Source
from cnnlab.data.cache import SPLITS, ImageCache, is_prepared, lock_path
from conftest import ROOT, tiny_overrides
from test_cifar10 import make_tarball
from test_prepare_parallel import cache_files, many_images
from test_real_images import crops  # noqa: F401 (a fixture)

WAITING = "waiting for another process to finish preparing"


def start(script: str, args: list[str], log: Path) -> subprocess.Popen:
    """One of our entry scripts, as a user starts it, its output in ``log``.out/.err (pipes could fill up)."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environment["NO_ALBUMENTATIONS_UPDATE"] = "1"
    return subprocess.Popen([sys.executable, f"src/{script}", *args], cwd=ROOT, env=environment,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def output(log: Path) -> str:
    return log.with_suffix(".out").read_text() + log.with_suffix(".err").read_text()


def assert_whole_or_absent(folder: Path) -> None:
    """What a reader may see at a cache's place: nothing, or a complete cache."""
    if folder.exists():
        assert is_prepared(folder), f"{folder} is there without its meta file"
        cache = ImageCache(folder)
        for split in SPLITS:
            part = cache.split(split)
            assert len(part.images) == len(part.labels)


def run_two_at_once(script: str, args: list[str], cache_dir: Path, logs: Path, timeout: float = 400) -> list[str]:
    """Start ``script`` twice while holding ``cache_dir``'s lock, let go once both wait for it, watch the
    cache's place until both end, and return their outputs (both must succeed)."""
    logs.mkdir()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path(cache_dir))
    lock.acquire()
    processes = [start(script, args, logs / str(i)) for i in range(2)]
    deadline = time.monotonic() + timeout
    try:
        while not all(WAITING in output(logs / str(i)) for i in range(2)):
            assert all(p.poll() is None for p in processes), [output(logs / str(i))[-3000:] for i in range(2)]
            assert time.monotonic() < deadline, "the processes never waited for the lock"
            time.sleep(0.2)
        assert not cache_dir.exists()  # neither wrote while another held the lock
    finally:
        lock.release()
    try:
        while any(p.poll() is None for p in processes):
            assert_whole_or_absent(cache_dir)
            assert time.monotonic() < deadline, "the processes did not finish"
            time.sleep(0.01)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    texts = [output(logs / str(i)) for i in range(2)]
    assert [p.returncode for p in processes] == [0, 0], [text[-3000:] for text in texts]
    assert_whole_or_absent(cache_dir)
    return texts


@pytest.mark.slow
def test_two_prepare_commands_on_a_new_image_folder_decode_it_once_into_one_cache(tmp_path, compose,
                                                                                 crops):  # noqa: F811
    root = many_images(tmp_path / "images", crops)  # 279 real photos and crops of them, train/ and test/
    args = ["data=imagefolder", f"data.source.root={root}", f"paths.root_dir={tmp_path}", "data.source.stored_size=32"]
    alone = instantiate(compose(*args).data.source, cache_root=str(tmp_path / "alone")).prepare()
    cache_dir = tmp_path / "data" / alone.dir.name
    texts = run_two_at_once("prepare.py", args, cache_dir, tmp_path / "logs")
    assert sorted(f"Decoding {root.name}" in text for text in texts) == [False, True]  # decoded by one of them
    assert all(f"{cache_dir}: 3 classes (china, flower, hopper)" in text for text in texts)  # both use that one
    assert [p.name for p in cache_dir.parent.iterdir()] == [cache_dir.name]
    assert cache_files(ImageCache(cache_dir)) == cache_files(alone)


@pytest.mark.slow
def test_two_trainings_on_an_unprepared_dataset_share_one_cache(tmp_path, compose):
    """Two train.py (through the shapes generator, prepared inside the training) as two prepare.py would."""
    args = [*tiny_overrides(tmp_path), "logger=none"]
    source = instantiate(compose(*args).data.source)
    alone = instantiate(compose(*args).data.source, root=str(tmp_path / "alone")).prepare()
    texts = run_two_at_once("train.py", args, source.cache_dir, tmp_path / "logs", timeout=500)
    assert sorted("Generating shapes" in text for text in texts) == [False, True]
    assert all("Test accuracy" in text for text in texts)
    assert [p.name for p in source.cache_dir.parent.iterdir()] == [source.cache_dir.name]
    assert cache_files(ImageCache(source.cache_dir)) == cache_files(alone)


class SlowTarball(http.server.BaseHTTPRequestHandler):
    """Serves the test's tarball in pieces over a second, counting the downloads."""

    payload = b""
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        piece = -(-len(self.payload) // 10)
        for start in range(0, len(self.payload), piece):
            self.wfile.write(self.payload[start:start + piece])
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, *args):
        pass


def _prepare_cifar(archive: str, cache_root: str, url: str, md5: str, results) -> None:
    cache = Cifar10Source(archive, cache_root, val_size=20, url=url, md5=md5).prepare()
    results.put(cache.dir.name)


@pytest.mark.slow
def test_two_processes_download_cifar10_once_and_share_one_cache(tmp_path):
    tarball = make_tarball(tmp_path / "served.tar.gz")
    SlowTarball.payload, SlowTarball.requests = tarball.read_bytes(), 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowTarball)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
    md5 = hashlib.md5(SlowTarball.payload).hexdigest()
    archive, cache_root = tmp_path / "data" / "cifar-10-python.tar.gz", tmp_path / "data"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=_prepare_cifar, args=(str(archive), str(cache_root), url, md5, results))
                 for _ in range(2)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
    finally:
        server.shutdown()
    assert [p.exitcode for p in processes] == [0, 0]
    names = [results.get(timeout=5) for _ in processes]
    assert SlowTarball.requests == 1  # the second process waited for the first one's download
    assert archive.read_bytes() == SlowTarball.payload
    assert names[0] == names[1] and sorted(p.name for p in cache_root.iterdir()) == sorted([names[0], archive.name])
    alone = Cifar10Source(tarball, tmp_path / "alone", val_size=20, download=False).prepare()
    shared = ImageCache(cache_root / names[0])
    for split in SPLITS:
        assert np.array_equal(shared.split(split).images, alone.split(split).images)
    assert json.loads((shared.dir / "meta.json").read_text())["classes"] == alone.classes
    shutil.rmtree(tmp_path / "alone")


@pytest.mark.slow
def test_a_prepare_killed_while_writing_leaves_no_cache_and_the_next_one_clears_what_it_left(tmp_path, compose,
                                                                                            crops):  # noqa: F811
    root = many_images(tmp_path / "images", crops)
    args = ["data=imagefolder", f"data.source.root={root}", f"paths.root_dir={tmp_path}", "data.source.workers=1"]
    (tmp_path / "logs").mkdir()
    process = start("prepare.py", args, tmp_path / "logs" / "killed")
    data, deadline = tmp_path / "data", time.monotonic() + 300
    while not (data.is_dir() and any(".partial-" in p.name for p in data.iterdir())):  # writing into its folder
        assert process.poll() is None and time.monotonic() < deadline, output(tmp_path / "logs" / "killed")[-3000:]
        time.sleep(0.005)
    process.kill()  # SIGKILL: no clean-up runs
    process.wait()
    left = sorted(p.name for p in data.iterdir())
    assert len(left) == 2 and left[0].endswith(".lock") and ".partial-" in left[1]  # and no cache
    cache = instantiate(compose(*args).data.source).prepare()
    assert [p.name for p in data.iterdir()] == [cache.dir.name]
    assert len(cache.meta["files"]) == 279


def test_a_folder_without_its_meta_file_at_the_cache_place_is_replaced(tmp_path, compose):
    """A partial copy (rsync cut short) or a deleted meta file: the rename into place would fail."""
    args = [f"paths.root_dir={tmp_path}", "data.source.train_size=40", "data.source.val_size=20",
            "data.source.test_size=20"]
    source = instantiate(compose(*args).data.source)
    source.cache_dir.mkdir(parents=True)
    (source.cache_dir / "train_images.npy").write_bytes(b"half")
    cache = source.prepare()
    assert cache.dir == source.cache_dir and len(cache.split("train").labels) == 40
    assert [p.name for p in source.cache_dir.parent.iterdir()] == [source.cache_dir.name]
