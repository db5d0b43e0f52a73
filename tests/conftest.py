import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from script_server import PLAIN, ScriptServer
from script_server import run as script_server_run

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def pytest_configure(config):
    """`pytest -n N` (make test: two workers on two cores): each worker, and every process it starts, gets its
    share of the cores as torch threads. With a thread per core each, the workers' OpenMP threads spin
    against each other: measured with test_scaling's DDP test beside test_zoo, 133 s and 3.3 CPU-minutes
    with two threads each, 78 s and 1.6 CPU-minutes with one. (Before any test module imports torch.)"""
    workers = config.getoption("numprocesses", default=None)  # set in pytest-xdist's controller; workers inherit
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


def pytest_collection_modifyitems(items):
    """Files with slow tests first, each file's tests kept together and in order: `make test` hands whole
    files to its two workers in this order, so the long ones start at once and the short ones fill the end
    instead of one worker finishing a long file while the other idles. The order is the same in every
    worker, as pytest-xdist requires."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: keeps the order within each group


ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def tiny_overrides(root: Path) -> list[str]:
    """A run small enough for a test: 64 training images, one epoch, no worker processes, and no MLflow model
    (a second each; the tests of the model and of trainings registering at once log it: mlflow_model.log=true)."""
    return [
        f"paths.root_dir={root}",
        "data.source.train_size=64",
        "data.source.val_size=32",
        "data.source.test_size=32",
        "data.batch_size=16",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "mlflow_model.log=false",
    ]


def script_env(env: dict | None = None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # only what the test sets
    return {**environment, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}


_server: ScriptServer | None = None
_server_lock = threading.Lock()


def script_server() -> ScriptServer | None:
    """This pytest process's script server, started on first use (none with CNNLAB_TEST_PLAIN=1)."""
    global _server
    with _server_lock:
        if _server is None and not PLAIN:
            _server = ScriptServer(script_env())
        return _server


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of our entry scripts the way a user does, from the project root (forked from a process that
    made its imports: tests/script_server.py)."""
    return script_server_run(script_server(), [f"src/{script}", *args], script_env(env), timeout)


@pytest.fixture
def compose():
    """Compose the project's config with overrides, as `python src/train.py` would (another script's: config_name)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str, return_hydra_config: bool = False, config_name: str = "config"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)

    return _compose


@pytest.fixture
def run_config(compose):
    """A composed config as a run sees it: ${hydra:...} resolves (Hydra's state is set, as in a run), no hydra node."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    def _config(*overrides):
        cfg = compose(*overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(Path(cfg.hydra.run.dir).resolve())  # as in a run
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    return _config


# Checkpoints hold plain values only ---------------------------------------------------------------
# Lightning reads checkpoints with torch's default, weights_only=True, and so does cnnlab.checkpoints:
# a checkpoint holding anything else (a class, a function) would be refused when it is read back.
# After each test, every checkpoint in the temporary folders its module made (its fixtures' and
# its tests') is scanned for the globals weights_only would refuse. A file is read once per change.
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
_scanned: dict[str, tuple[int, int]] = {}  # path -> (mtime_ns, size) when it was scanned
_scan_seconds = [0.0]                      # the scan's own cost, said at the end
_WORKER_SCANS = pytest.StashKey[list]()    # pytest-xdist: each worker's (count, seconds), on the controller


@pytest.fixture(scope="module", autouse=True)
def _folders_before_module(tmp_path_factory):
    """The temporary folders that existed before this module: every other one is its own."""
    return set(tmp_path_factory.getbasetemp().iterdir())


@pytest.fixture(autouse=True)
def _checkpoints_hold_plain_values(_folders_before_module, tmp_path_factory):
    yield
    start = time.perf_counter()
    new = set(tmp_path_factory.getbasetemp().iterdir()) - _folders_before_module
    problems = [f"{path}: would import {', '.join(found)}"
                for folder in new if not folder.is_symlink()  # pytest links <name>current to <name>N
                for path, found in unsafe_checkpoints(folder)]
    _scan_seconds[0] += time.perf_counter() - start
    if problems:
        pytest.fail("checkpoints must hold only tensors and plain values (weights_only=True reads them): "
                    + "; ".join(problems), pytrace=False)


def unsafe_checkpoints(folder: Path):
    """(path, globals) for each checkpoint under ``folder`` that weights_only=True would refuse."""
    import zipfile

    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            if not name.endswith(CHECKPOINT_SUFFIXES) or not os.path.isfile(path):
                continue
            stat = os.stat(path)
            if _scanned.get(path) == (stat.st_mtime_ns, stat.st_size):
                continue
            _scanned[path] = (stat.st_mtime_ns, stat.st_size)
            # torch.save writes zip files; anything else here is a test's deliberately broken file
            if zipfile.is_zipfile(path):
                from torch.serialization import get_unsafe_globals_in_checkpoint  # torch only once one is found

                found = get_unsafe_globals_in_checkpoint(path)
                if found:
                    yield path, found


def pytest_sessionfinish(session):
    if _server is not None:
        _server.close()
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its count goes to the controller
        session.config.workeroutput["checkpoints_scanned"] = (len(_scanned), _scan_seconds[0])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    scanned = getattr(node, "workeroutput", {}).get("checkpoints_scanned", (0, 0.0))
    node.config.stash.setdefault(_WORKER_SCANS, []).append(scanned)


def pytest_terminal_summary(terminalreporter, config):
    """Say how many checkpoint files the scan read (a scan that sees none is noticed) and what it cost."""
    workers = config.stash.get(_WORKER_SCANS, [])
    count = len(_scanned) + sum(c for c, _ in workers)
    seconds = _scan_seconds[0] + sum(s for _, s in workers)
    terminalreporter.write_line(f"checkpoints scanned for pickled code: {count} files in {seconds:.1f} s")


def photographs() -> dict[str, Path]:
    """{class: the photo its images are cut from}, found where the installed packages keep them."""
    sklearn = pytest.importorskip("sklearn", reason="scikit-learn ships china.jpg and flower.jpg")
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib ships grace_hopper.jpg")
    sample_images = Path(sklearn.__file__).parent / "datasets" / "images"
    photos = {"china": sample_images / "china.jpg", "flower": sample_images / "flower.jpg",
              "hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    for path in photos.values():
        if not path.is_file():
            pytest.skip(f"{path} is not installed")
    return photos


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until ``url`` answers; fails with the end of ``log`` if ``process`` ended or ``timeout`` passed first."""
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"{url} did not answer: {log.read_text()[-3000:]}")
            time.sleep(0.3)
