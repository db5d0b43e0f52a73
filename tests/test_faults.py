"""A run that cannot go on says so in one line and keeps what it had: a non-finite loss, a tracking
server that does not answer, a full disk. Real processes; the faults are real or injected where
nothing else can make them happen on cue."""

import os
import signal
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from filelock import FileLock
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow

TASK = ["data.source.train_size=256", "data.source.val_size=32", "data.source.test_size=32", "data.batch_size=32",
        "data.num_workers=0", "trainer.max_epochs=3"]
TESTS = os.path.dirname(__file__)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def only_run(root):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    return client, run


def test_a_nan_loss_stops_the_run_with_one_line_keeps_the_last_good_checkpoint_and_fails_the_run(tmp_path):
    result = run_script("train.py", f"paths.root_dir={tmp_path}", *TASK, "+callbacks.fault._target_=faults.InfiniteWeight",
                        "+callbacks.fault.epoch=2", env={"PYTHONPATH": TESTS})
    assert result.returncode == 1, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert "the training loss became nan at epoch 2, step 9 (batch 1 of the epoch)" in line, line
    assert "Traceback" not in result.stderr and "Continue it" not in result.stderr

    [folder] = (tmp_path / "outputs" / "runs").iterdir()
    last = folder / "checkpoints" / "last.ckpt"
    assert f"The last good checkpoint is {last} (the end of epoch 1)" in line
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (folder / "metrics.json").exists()
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED" and "val/acc" in run.data.metrics and "test/acc" not in run.data.metrics


def a_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing answers there


@pytest.mark.parametrize("script", ["train.py", "prepare.py"])
def test_a_tracking_server_that_does_not_answer_fails_in_seconds_before_any_work(tmp_path, script):
    uri = f"http://127.0.0.1:{a_closed_port()}"
    started = time.monotonic()
    result = run_script(script, f"paths.root_dir={tmp_path}", *TASK, f"tracking_uri={uri}")
    assert result.returncode == 2 and time.monotonic() - started < 30, result.stderr[-3000:]
    assert error_lines(result.stderr) == [f"Error: the MLflow tracking server {uri} does not answer "
                                          "([Errno 111] Connection refused): start it, or leave tracking_uri and "
                                          "MLFLOW_TRACKING_URI unset for the local SQLite store"]
    assert not (tmp_path / "data").exists()  # nothing prepared
    assert not list((tmp_path / "outputs").glob("runs/*/checkpoints"))


FILL_THE_DISK_AFTER_THE_FIRST_CHECKPOINT = """
set -e
mount -t tmpfs -o size=64m tmpfs "$RUNS"
"$PYTHON" src/train.py "$@" &
train=$!
until ls "$RUNS"/*/checkpoints/last.ckpt >/dev/null 2>&1; do sleep 0.02; done
cat /dev/zero > "$RUNS/filler" 2>/dev/null || true   # the disk is full now
set +e
wait $train
status=$?
df -k "$RUNS" | tail -1
ls -a "$RUNS"/*/checkpoints
exit $status
"""


def test_a_full_disk_while_checkpointing_is_one_clear_line_and_keeps_the_last_checkpoint(tmp_path):
    """The run folder on a 64 MB tmpfs (a private mount namespace: `unshare`), filled once the first epoch's
    checkpoint is written; the second epoch's checkpoint cannot be."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no unshare here to mount a small tmpfs without privileges")
    runs = tmp_path / "outputs" / "runs"
    runs.mkdir(parents=True)
    environment = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                   "NO_ALBUMENTATIONS_UPDATE": "1", "RUNS": str(runs), "PYTHON": sys.executable}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", FILL_THE_DISK_AFTER_THE_FIRST_CHECKPOINT, "sh",
                             f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/outputs", *TASK],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert line.startswith(f"Error: no space left on the disk of {runs}/") and "MiB free) while writing" in line, line
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Continue it, in the same folder and MLflow run, with:" in result.stdout
    listing = result.stdout.splitlines()
    assert "last.ckpt" in listing and not [name for name in listing if ".partial" in name], listing
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"


def has_a_run(root) -> bool:
    """Whether the script's run is open. The store is read under the lock our scripts create it under:
    opening it while the script creates its tables races that creation (SQLAlchemy then sees half a schema)."""
    if not (root / "mlflow.db").exists():
        return False
    with FileLock(f"{root}/mlflow.db.lock", timeout=60):
        try:
            return bool(only_run(root))
        except Exception:  # no experiment or no run yet
            return False


def test_a_script_other_than_train_closes_its_run_the_same_way_killed_or_failed(tmp_path):
    """prepare.py through the lifecycle every script shares: SIGTERM mid-work -> KILLED, no traceback, no
    cache; a bad image file (no skip_bad_images) -> FAILED with the one line naming it."""
    process = subprocess.Popen([sys.executable, "src/prepare.py", f"paths.root_dir={tmp_path}",
                                "data.source.train_size=100000"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                                    "NO_ALBUMENTATIONS_UPDATE": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not has_a_run(tmp_path):
        time.sleep(0.2)
    time.sleep(1)  # its run is open, and it is generating (100,000 images take minutes)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.splitlines()[-1] == "Stopped (SIGTERM)."
    assert [path.name for path in (tmp_path / "data").iterdir()] == [], "a half-written cache was left"
    client, run = only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["cnnlab.stage"] == "prepare"

    images = tmp_path / "images"
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            (images / split / label).mkdir(parents=True)
            Image.new("RGB", (40, 40), "red" if label == "a" else "blue").save(images / split / label / "ok.png")
    (images / "train" / "a" / "broken.png").write_bytes(b"\\x89PNG not really")
    failed = run_script("prepare.py", f"paths.root_dir={tmp_path / 'second'}", "data=imagefolder",
                        f"data.source.root={images}")
    assert failed.returncode == 2 and "train/a/broken.png" in error_lines(failed.stderr)[0], failed.stderr[-3000:]
    client, run = only_run(tmp_path / "second")
    assert run.info.status == "FAILED" and run.data.tags["cnnlab.stage"] == "prepare"
