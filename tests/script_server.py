"""Our scripts, run for the tests from a server process that made their slow imports once.

Each run is a fork of the server: the same argv, sys.path, working directory, environment, standard
streams and exit code as `python src/<script>.py args` from the project root, without the 3-6 s of
imports (torch, Lightning, MLflow, albumentations) every new Python spends before the script's first
line. Nothing in the server touches torch beyond importing it, so a child starts as a new process
would after its imports. CNNLAB_TEST_PLAIN=1 runs every script as a new Python instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = os.environ.get("CNNLAB_TEST_PLAIN") == "1"

SERVER = r"""
import json, os, runpy, signal, sys, traceback
sys.path.insert(0, os.path.abspath("src"))
import albumentations, hydra, mlflow, pytorch_lightning, torch  # noqa: F401  the slow imports, once
import cnnlab.training.run, cnnlab.evaluation.evaluate, cnnlab.evaluation.ensemble  # noqa: F401
sys.path.pop(0)
import gc; gc.freeze()  # the children's collections skip what the imports made: scanning it took 0.5 s a run
sys.stdout.flush(); sys.stderr.flush()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            out = os.open(job["stdout"], write)
            err = out if job["stderr"] == job["stdout"] else os.open(job["stderr"], write)
            os.dup2(out, 1); os.dup2(err, 2)
            nothing = os.open(os.devnull, os.O_RDONLY)
            os.dup2(nothing, 0)
            for fd in {out, err, nothing}:
                os.close(fd)
            os.environ.clear(); os.environ.update(job["env"])
            signal.alarm(job["timeout"])
            sys.argv = job["argv"]
            # as `python src/x.py` has it: the script's folder first (not the working directory), then PYTHONPATH
            extra = [os.path.abspath(p) for p in job["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.path[0:1] = [os.path.abspath(os.path.dirname(sys.argv[0])), *extra]
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                if not isinstance(exit.code, (int, type(None))):
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    print("EXIT", os.waitstatus_to_exitcode(status), flush=True)
"""


class ScriptServer:
    """One server process; its runs one at a time (a lock), from any thread."""

    def __init__(self, env: dict[str, str]):
        self.lock = threading.Lock()
        self.log = tempfile.NamedTemporaryFile(prefix="script-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def run(self, argv: list[str], env: dict[str, str], timeout: int, stdout: Path, stderr: Path) -> int:
        """Exit code of `python *argv` (from the project root), its streams written to the two files (or one)."""
        job = {"argv": argv, "env": env, "timeout": timeout, "stdout": str(stdout), "stderr": str(stderr)}
        with self.lock:
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
            for line in self.process.stdout:
                if line.startswith("EXIT "):
                    code = int(line.split()[1])
                    if code == -signal.SIGALRM:
                        raise subprocess.TimeoutExpired(["python", *argv], timeout)
                    return code
        raise RuntimeError(f"the script server ended: {Path(self.log.name).read_text()[-3000:]}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        os.unlink(self.log.name)


def run(server: ScriptServer | None, argv: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """`python *argv` from the project root, as subprocess.run(capture_output=True, text=True) reports it:
    forked from ``server``, or a new Python when there is none."""
    if server is None:
        return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="script-") as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        code = server.run(argv, env, timeout, stdout, stderr)
        return subprocess.CompletedProcess(["python", *argv], code, stdout.read_text(), stderr.read_text())
