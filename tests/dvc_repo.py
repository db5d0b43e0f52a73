"""A copy of the project in a new git repository, and real `git` and `dvc` commands run in it
(the main pipeline's tests and the studies' tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, script_server


def is_result(name: str) -> bool:
    """The default runs' results (dvc.lock, results/ folders): a copy starts from code alone."""
    parts = Path(name).parts
    return parts[-1] == "dvc.lock" or "results" in parts[:-1] and parts[0] in ("results", "pipelines")


def copy_project(root: Path, studies: tuple[str, ...] = ()) -> Path:
    """The files git would commit, less the results and the studies not named (DVC reads every
    dvc.yaml of a repository), into ``root`` (not yet a repository)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        parts = Path(name).parts
        if parts[0] == "pipelines" and len(parts) > 2 and parts[1] not in studies:
            continue
        if not is_result(name) and (ROOT / name).is_file():  # ls-files still lists a file deleted, not committed
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    return root


def commit_all(repo: Path, message: str) -> None:
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=environment(), capture_output=True, text=True,
                          check=True).stdout.strip()


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("DVC_")}
    identity = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
    # stages run `python ...`: the script server's (tests/script_server.py), then this interpreter's environment
    server = script_server()
    path = [*([str(server.bin)] if server else []), str(Path(sys.executable).parent), env.get("PATH", "")]
    return {**env, **identity, "PATH": os.pathsep.join(path), "NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}


def dvc(repo: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    dvc_exe = Path(sys.executable).parent / "dvc"
    server = script_server()
    if server is not None:
        server.wait()  # its imports done: the first stages reach it too
    result = subprocess.run([str(dvc_exe), *args], cwd=repo, env=environment(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, \
        f"dvc {' '.join(args)} exited with {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout + result.stderr))


def merge(config: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            merge(config[key], value)
        else:
            config[key] = value


def stage_keys(name: str, stage: dict) -> tuple[set[str], set[str]]:
    """The params keys a stage's command interpolates, and those it lists (``item.`` spelled out)."""
    collection = stage["foreach"].strip("${}") if "foreach" in stage else None
    body = stage.get("do", stage)

    def spelled(key: str) -> str:
        return re.sub(r"^item\b", f"{collection}.${{key}}", key) if collection else key

    used = {spelled(key) for key in re.findall(r"(?<!\\)\$\{([^}]+)\}", body["cmd"]) if key != "key"}
    return used, {spelled(key) for key in body.get("params", [])}
