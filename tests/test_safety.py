"""Safe by default (issue 12), through the real scripts:

- a checkpoint that would run code when read is refused in one line naming the file and what it
  would import, and its code never runs (evaluate, report, pretrained weights, resume);
- names from configs and result files cannot put a file outside its folder;
- every `mlflow ui` / `mlflow server` command we print or document serves this machine only.

Files meant to be refused are made outside pytest's temporary folders: tests/conftest.py fails any
test that leaves an unsafe checkpoint there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script, tiny_overrides

UNSAFE_GLOBAL = f"{os.name}.system"  # what pickle records for os.system: posix.system on Linux


class RunsShellCommand:
    """Unpickled without weights_only, this runs a shell command: the attack a checkpoint can carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny training run: its root (data, MLflow store) and its best checkpoint."""
    root = tmp_path_factory.mktemp("safety")
    result = run_script("train.py", *tiny_overrides(root))
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = root.glob("outputs/runs/*/checkpoints/best.ckpt")
    return root, checkpoint


@pytest.fixture
def outside():
    """A folder outside pytest's temporary ones (see the module's docstring), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-safety-"))
    yield folder
    shutil.rmtree(folder)


def made_unsafe(checkpoint: Path, target: Path, marker: Path) -> Path:
    """``checkpoint`` with one more entry whose unpickling would create ``marker``, saved as ``target``."""
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    content["note"] = RunsShellCommand(f"touch {shlex.quote(str(marker))}")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, target)
    return target


def assert_refused(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 and one `Error:` line containing ``words``, no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(word in errors[0] for word in words), errors[0]


# Checkpoints that would run code ------------------------------------------------------------------

@pytest.mark.slow
def test_our_checkpoints_and_fixtures_hold_plain_values_only(trained):
    _, checkpoint = trained
    files = [checkpoint, checkpoint.with_name("last.ckpt"), *(ROOT / "tests" / "fixtures").rglob("*.pt")]
    assert len(files) >= 3
    unsafe = {str(f): torch.serialization.get_unsafe_globals_in_checkpoint(f) for f in files}
    assert unsafe == {str(f): [] for f in files}


@pytest.mark.slow
def test_evaluate_refuses_a_checkpoint_that_would_run_code(trained, outside, tmp_path):
    root, checkpoint = trained
    marker = outside / "code-ran"
    evil = made_unsafe(checkpoint, outside / "best.ckpt", marker)
    result = run_script("evaluate.py", *tiny_overrides(root), f"ckpt={evil}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert_refused(result, str(evil), UNSAFE_GLOBAL)
    assert not marker.exists()


@pytest.mark.slow
def test_pretrained_weights_that_would_run_code_are_refused(trained, outside):
    root, checkpoint = trained
    marker = outside / "code-ran"
    evil = made_unsafe(checkpoint, outside / "weights.pth", marker)
    result = run_script("train.py", *tiny_overrides(root), f"model.pretrained={evil}", "logger=none")
    assert_refused(result, str(evil), UNSAFE_GLOBAL)
    assert not marker.exists()


@pytest.mark.slow
def test_report_refuses_a_pretrain_checkpoint_that_would_run_code(trained, outside):
    root, checkpoint = trained
    marker = outside / "code-ran"
    results = outside / "results"
    for stage in ("ensemble", "pretrain"):
        (results / stage).mkdir(parents=True)
        (results / stage / "metrics.json").write_text("{}")
    evil = made_unsafe(checkpoint, results / "pretrain" / "checkpoints" / "best.ckpt", marker)
    result = run_script("report.py", f"paths.root_dir={root}", f"results_dir={results}", "logger=none")
    assert_refused(result, str(evil), UNSAFE_GLOBAL)
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("given", ["run folder", "its last.ckpt", "a lone checkpoint"])
def test_resume_refuses_a_checkpoint_that_would_run_code(trained, outside, given):
    """A run folder's last.ckpt continues that run; a checkpoint from elsewhere starts a new run from it."""
    root, checkpoint = trained
    marker = outside / "code-ran"
    folder = outside / "run"
    evil = made_unsafe(checkpoint, folder / "checkpoints" / "last.ckpt" if given != "a lone checkpoint"
                       else outside / "lone.ckpt", marker)
    resume = folder if given == "run folder" else evil
    result = run_script("train.py", *tiny_overrides(root), f"resume={resume}", "logger=none")
    assert not marker.exists()  # Lightning's torch.load refuses it too, with a traceback: the one line is ours
    assert_refused(result, str(evil), UNSAFE_GLOBAL)


def test_the_suite_fails_a_test_that_leaves_an_unsafe_checkpoint(outside):
    """tests/conftest.py's scan, run on a small suite of its own: in a test's folder or a module fixture's."""
    for name in ("conftest.py", "script_server.py"):  # the conftest and what it imports
        shutil.copy(ROOT / "tests" / name, outside / name)
    (outside / "test_inner.py").write_text(
        "import os\nimport pytest\nimport torch\n\n"
        "class Payload:\n    def __reduce__(self):\n        return os.system, ('true',)\n\n"
        "@pytest.fixture(scope='module')\n"
        "def shared(tmp_path_factory):\n    return tmp_path_factory.mktemp('shared')\n\n"
        "def test_plain(tmp_path):\n    torch.save({'w': torch.zeros(2), 'epoch': 1}, tmp_path / 'plain.ckpt')\n\n"
        "def test_unsafe_in_its_folder(tmp_path):\n    torch.save({'p': Payload()}, tmp_path / 'bad.ckpt')\n\n"
        "def test_unsafe_in_a_module_folder(shared):\n    torch.save({'p': Payload()}, shared / 'bad.pth')\n\n"
        "def test_after(tmp_path):\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
                             f"--basetemp={outside / 'tmp'}", "-rE", "test_inner.py"],
                            cwd=outside, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert re.search(r"\b4 passed, 2 errors\b", output), output[-3000:]
    assert "ERROR test_inner.py::test_unsafe_in_its_folder" in output
    assert "ERROR test_inner.py::test_unsafe_in_a_module_folder" in output
    assert f"bad.ckpt: would import {UNSAFE_GLOBAL}" in output and f"bad.pth: would import {UNSAFE_GLOBAL}" in output
    assert "checkpoints scanned for pickled code: 3 files in " in output


# Names that become paths --------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("callbacks.checkpoint.filename=../../escaped", "callbacks.checkpoint.filename=../../escaped"),
    ("model.name=../../../escaped", "model.name=../../../escaped"),  # the cached features' folder
])
def test_a_config_name_that_leads_out_of_its_folder_is_refused(tmp_path, override, key):
    root = tmp_path / "root"
    result = run_script("train.py", *tiny_overrides(root), "freeze=all_but_head", "logger=none", override)
    assert_refused(result, key, "must be a name without '/'")
    assert not [p for p in tmp_path.rglob("*escaped*")]


@pytest.mark.parametrize("name", ["../escaped", ".."])
def test_a_run_folder_name_from_the_environment_that_leads_out_is_refused(tmp_path, name):
    """CNNLAB_RUN_ID (and torchrun's --rdzv-id, SLURM's job ids) name the folder under outputs/runs."""
    root = tmp_path / "root"
    result = run_script("train.py", *tiny_overrides(root), "logger=none", env={"CNNLAB_RUN_ID": name})
    assert result.returncode != 0 and f"run folder name {name!r}" in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.rglob("escaped")) and not (root / "outputs").exists()


def write_member(folder: Path) -> Path:
    """A hand-made evaluation folder: two classes, two test images."""
    folder.mkdir(parents=True)
    (folder / "predictions.csv").write_text("index,label,predicted,a,b\n0,a,a,0.9,0.1\n1,b,b,0.2,0.8\n")
    return folder


def test_an_ensemble_member_named_only_dots_is_refused(tmp_path):
    """Its name becomes an MLflow key and, in the pipeline, a folder (results/evaluate/<name>): '..' is the parent."""
    first, second = write_member(tmp_path / "x"), write_member(tmp_path / "y")
    result = run_script("ensemble.py", f"paths.root_dir={tmp_path}", "logger=none",
                        f"members={{..: {first}, b: {second}}}")
    assert_refused(result, "member name '..'")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("metrics.json"))


@pytest.mark.slow
def test_report_refuses_a_member_name_from_its_results_that_leads_out(trained, tmp_path):
    root, checkpoint = trained
    results = tmp_path / "results"
    (results / "pretrain" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, results / "pretrain" / "checkpoints" / "best.ckpt")
    (results / "pretrain" / "metrics.json").write_text(json.dumps({"test/acc": 0.5}))
    (results / "ensemble").mkdir()
    (results / "ensemble" / "metrics.json").write_text(json.dumps({"..": {"acc": 0.5}, "ensemble": {"acc": 0.5}}))
    result = run_script("report.py", f"paths.root_dir={root}", f"results_dir={results}", "logger=none",
                        f"hydra.run.dir={tmp_path / 'report'}")
    assert_refused(result, "names a member '..'")


# The MLflow UI serves this machine only ---------------------------------------------------------

def serving_commands(text: str) -> list[str]:
    """`mlflow ui ...` and `mlflow server ...` with options, to the end of the line or the inline code;
    a bare `mlflow ui` in prose names the program and starts nothing."""
    return [m.group(0) for m in re.finditer(r"mlflow (?:ui|server)\b[^\n`]*", text) if "--" in m.group(0)]


def test_every_mlflow_ui_and_server_command_serves_this_machine_only():
    from cnnlab.tracking import ui_command

    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted(p for p in (ROOT / "scripts").rglob("*") if p.is_file() and p.suffix in (".sh", ".py", ""))]
    make = subprocess.run(["make", "-n", "-s", "ui"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    commands = {str(p.relative_to(ROOT)): serving_commands(p.read_text(errors="replace")) for p in documents}
    commands["make ui"] = serving_commands(make.stdout)
    commands["printed after a run"] = serving_commands(ui_command("sqlite:////tmp/mlflow.db"))
    found = [(where, c) for where, listed in commands.items() for c in listed]
    assert {"README.md", "docs/sweeps.md", "make ui", "printed after a run"} <= {w for w, _ in found}, commands
    assert [(w, c) for w, c in found if "--host 127.0.0.1" not in c] == []
    # another host is the user's explicit choice: make ui UI_HOST=..., and not an environment variable
    chosen = subprocess.run(["make", "-n", "-s", "ui", "UI_HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "UI_HOST": "10.1.2.3"})
    assert serving_commands(chosen.stdout)[-1].count("--host 0.0.0.0") == 1, chosen.stdout
    from_environment = subprocess.run(["make", "-n", "-s", "ui"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                      env={**os.environ, "UI_HOST": "0.0.0.0", "HOST": "0.0.0.0"})
    assert "--host 127.0.0.1" in serving_commands(from_environment.stdout)[-1]
