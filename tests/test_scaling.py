"""Scaling out: the trainer presets, DDP on CPU (gloo) through `python src/train.py trainer=ddp_cpu`, two nodes
simulated with two torchrun launches on 127.0.0.1, and the data module's sharding against one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab import launch, schema, tracking
from cnnlab.data.datamodule import EpochShuffle, Shard, per_process_batch
from cnnlab.errors import ConfigError
from cnnlab.training.loggers import OtherProcessLogger
from conftest import ROOT, run_script, tiny_overrides

# Validation and test splits that two processes cannot share evenly (101 and 103 images): each image
# must still count exactly once. Four distinct shapes, so that a few CPU-seconds of training learn something.
SPLITS = ["data.source.classes=[circle,cross,ring,star]", "data.source.val_size=101", "data.source.test_size=103",
          "data.batch_size=32", "data.num_workers=0"]
TEST_IMAGES, VAL_IMAGES = 103, 101
# A VGG without BatchNorm and dropout, trained by SGD: nothing in it depends on how a batch is split among
# processes, so DDP must compute what one process computes, to float rounding.
SPLIT_FREE = [*SPLITS, "data.source.train_size=640", "trainer.max_epochs=2", "model=vgg11", "scaling.width=0.5",
              "model.head_hidden=[128]", "model.head_pool=1", "model.dropout=0", "optimizer=sgd"]
# The default model (BatchNorm: each process normalises over its half of the batch) far enough to learn.
DEFAULT_MODEL = [*SPLITS, "data.source.train_size=1600", "trainer.max_epochs=4", "optimizer.lr=0.004"]


def train(root, data, *overrides) -> subprocess.CompletedProcess:
    result = run_script("train.py", f"paths.root_dir={root}", f"paths.data_dir={data}", *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_run(root):
    """The run folder, its metrics.json and its MLflow run; fails unless there is exactly one of each."""
    folders = list((root / "outputs" / "runs").iterdir())
    assert len(folders) == 1, folders
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return folders[0], json.loads((folders[0] / "metrics.json").read_text()), runs[0]


def weights(folder):
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The prepared data every run here shares, and one process's run of SPLIT_FREE on it: the reference."""
    data, root = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("one_process")
    train(root, data, *SPLIT_FREE)
    folder, metrics, _ = one_run(root)
    return data, metrics, weights(folder)


def assert_computes_what_one_process_computes(folder, metrics, one_process):
    _, reference, reference_weights = one_process
    assert metrics["test/images"] == reference["test/images"] == TEST_IMAGES
    assert metrics == pytest.approx(reference, abs=1e-4)
    ours = weights(folder)
    for name, value in reference_weights.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert ((ours[name] - value).abs().max() / scale).item() < 1e-4, name


@pytest.mark.slow
def test_ddp_cpu_computes_what_one_process_does_in_one_folder_and_one_mlflow_run(one_process, tmp_path):
    result = train(tmp_path, one_process[0], *SPLIT_FREE, "trainer=ddp_cpu", "trainer.devices=2")
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr

    folder, metrics, run = one_run(tmp_path)
    assert_computes_what_one_process_computes(folder, metrics, one_process)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/images"] == TEST_IMAGES and run.data.metrics["val/images"] == VAL_IMAGES
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    # each process its own log file: the first process's holds no line of the second's
    logs = sorted(p.name for p in folder.glob("*.log"))
    assert logs[0] == "train.log" and len(logs) == 2, logs
    assert "GLOBAL_RANK: 1" in (folder / logs[1]).read_text()
    assert "GLOBAL_RANK: 1" not in (folder / "train.log").read_text()


@pytest.mark.slow
def test_ddp_cpu_trains_the_default_model_as_well_as_one_process(one_process, tmp_path):
    data = one_process[0]
    results = [one_run(root)[1] for root in (tmp_path / "one", tmp_path / "two")
               if train(root, data, *DEFAULT_MODEL, *(["trainer=ddp_cpu"] if root.name == "two" else []))]
    one, two = (r["test/acc"] for r in results)
    # both learn (chance is 0.25), and as well within noise: BatchNorm normalises over 16 images instead of 32
    assert min(one, two) >= 0.4 and abs(one - two) <= 0.12, results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_under_torchrun_share_one_folder_and_one_mlflow_run(one_process, tmp_path):
    """Two `torchrun --nnodes=2` launches on 127.0.0.1, as two machines of a cluster would start them."""
    port = free_port()
    environment = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                   "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--master-addr=127.0.0.1", f"--master-port={port}", "--rdzv-id=two-nodes-test", "src/train.py",
         f"paths.root_dir={tmp_path}", f"paths.data_dir={one_process[0]}", *SPLIT_FREE, "trainer=ddp_cpu",
         "trainer.devices=1", "trainer.num_nodes=2"],
        cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]

    folder, metrics, run = one_run(tmp_path)
    assert folder.name == "torchrun-two-nodes-test"
    assert run.info.status == "FINISHED" and run.data.metrics["test/images"] == TEST_IMAGES
    assert_computes_what_one_process_computes(folder, metrics, one_process)
    assert sorted(p.name for p in folder.glob("*.log")) == ["train.log", "train.rank1.log"]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tmp_path):
    tiny = [o for o in tiny_overrides(tmp_path) if not o.startswith("data.batch_size=")]
    result = run_script("train.py", *tiny, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=33")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (  # after the data's progress bar
        "Error: data.batch_size=33 is the global batch and must divide evenly among the run's 2 processes "
        "(devices x num_nodes); use a multiple of 2")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sweep_that_lightning_would_relaunch_is_refused(tmp_path):
    result = run_script("train.py", "-m", *tiny_overrides(tmp_path), "trainer=ddp_cpu", "seed=1,2")
    assert result.returncode == 2
    assert not list((tmp_path / "outputs" / "multirun").glob("*/*/checkpoints"))  # no job trained
    assert result.stderr.strip().splitlines()[-1].startswith("Error: -m with 2 DDP processes: Lightning starts them")


def test_sync_batchnorm_is_refused_on_the_cpu(run_config):
    with pytest.raises(ConfigError, match=r"^trainer.sync_batchnorm=true: must be false on the CPU"):
        schema.validate(run_config("trainer=ddp_cpu", "trainer.sync_batchnorm=true"), schema.Train)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_the_gpu_preset_without_a_gpu_says_so_in_one_line(tmp_path):
    result = run_script("train.py", f"paths.root_dir={tmp_path}", "trainer=gpu", "data.source.train_size=32",
                        "data.source.val_size=16", "data.source.test_size=16")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: trainer.accelerator=gpu: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
        "use trainer=cpu, or trainer=ddp_cpu for several processes")
    assert "Traceback" not in result.stderr


# The data module's sharding, against one process ---------------------------------------------------

@pytest.mark.parametrize("size, world", [(10, 2), (11, 2), (11, 3), (7, 4)])
def test_processes_together_take_one_process_batches_with_the_same_distortion_seeds(size, world):
    batch = 4 * world
    whole = list(EpochShuffle(size, seed=5, sample_seeds=True))
    shares = [list(EpochShuffle(size, seed=5, sample_seeds=True, rank=r, world=world)) for r in range(world)]
    assert len({len(share) for share in shares}) == 1  # every process takes as many steps
    per_process = batch // world
    for step in range(len(shares[0]) // per_process):
        together = sorted(key for share in shares for key in share[step * per_process:(step + 1) * per_process])
        expected = sorted(whole[step * batch:(step + 1) * batch])
        padded = (step + 1) * batch > size  # the last global batch is topped up with the order's first images
        assert together == expected if not padded else set(expected) <= set(together)
    assert {key for share in shares for key in share} == set(whole)


@pytest.mark.parametrize("size, world", [(103, 2), (101, 3), (5, 4)])
def test_evaluation_shards_cover_each_image_exactly_once(size, world):
    indices = np.concatenate([list(Shard(size, rank, world)) for rank in range(world)])
    assert np.array_equal(np.sort(indices), np.arange(size))


def test_per_process_batch():
    assert per_process_batch(64, 4) == 16
    with pytest.raises(ConfigError, match="multiple of 3"):
        per_process_batch(64, 3)


# What each process learns from its launcher --------------------------------------------------------

@pytest.mark.parametrize("environment, label", [
    ({}, None), ({"RANK": "0"}, None), ({"RANK": "3"}, "rank3"), ({"SLURM_PROCID": "1"}, "rank1"),
    ({"LOCAL_RANK": "1"}, "node0-local1"), ({"NODE_RANK": "1"}, "node1-local0"),
])
def test_process_label(monkeypatch, environment, label):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert launch.process_label() == label


def test_shared_run_name_comes_from_the_launcher(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_STEP_ID", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert launch.shared_run_name() is None
    monkeypatch.setenv("SLURM_NTASKS", "8"), monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert launch.shared_run_name() == "slurm-4711.0"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: a run of its own, even inside a job
    assert launch.shared_run_name() is None
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="--rdzv-id"):
        launch.shared_run_name()


def test_other_processes_never_open_the_mlflow_store(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    logger = tracking.mlflow_logger("cnnlab", None, str(tmp_path / "mlflow.db"), str(tmp_path / "artifacts"))
    logger.log_hyperparams({"a": 1}), logger.experiment.log_text(logger.run_id, "text", "file.txt")
    assert isinstance(logger, OtherProcessLogger) and list(tmp_path.iterdir()) == []


def test_the_slurm_script_runs_a_valid_training_command(run_config):
    """scripts/slurm/train_ddp.sbatch: its srun line is a train.py command whose config composes and validates."""
    script = (ROOT / "scripts" / "slurm" / "train_ddp.sbatch").read_text().replace("\\\n", " ")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    words = srun.split()
    assert words[:3] == ["srun", "python", "src/train.py"] and words[-1] == '"$@"'
    cfg = run_config(*words[3:-1], "data.source.root=/tmp")
    schema.validate(cfg, schema.Train)
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices) == ("ddp", 2, 8)
    assert "--ntasks-per-node=8" in script and "--nodes=2" in script  # one task per GPU, as Lightning's SLURM wants


@pytest.mark.slow
def test_compiled_channels_last_training_saves_checkpoints_that_load_anywhere(tmp_path):
    """trainer.compile=true and trainer.channels_last=true (the gpu preset's levers), on the CPU."""
    from cnnlab.training.module import ImageClassifier

    result = run_script("train.py", *tiny_overrides(tmp_path), "trainer.compile=true", "trainer.channels_last=true",
                        "logger=none")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = next((tmp_path / "outputs" / "runs").glob("*/checkpoints/last.ckpt"))
    module = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()  # a plain, uncompiled module
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert set(state) == set(module.state_dict())  # no torch.compile prefixes (_orig_mod.)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert module(images).shape == (2, 10)
