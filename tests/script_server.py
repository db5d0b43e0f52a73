"""Our scripts, run for the tests from a server process that made their slow imports once.

Each run is a fork of the server: the same argv, sys.path, working directory, environment, standard
streams (the caller's own file descriptors, passed over a Unix socket) and exit code as
`python <script>.py args`, without the 3-6 s of imports (torch, Lightning, MLflow, albumentations)
every new Python spends before the script's first line. Nothing in the server touches torch beyond
importing it, so a child starts as a new process would after its imports. Stages that `dvc repro`
runs reach it through a `python` first on their PATH (``ScriptServer.bin``), which hands the server
a script and runs anything else as the real interpreter. CNNLAB_TEST_PLAIN=1: no server, every
script a new Python.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = os.environ.get("CNNLAB_TEST_PLAIN") == "1"

# What a client sends: an 8-byte length and that much JSON (argv, env, cwd, timeout), with its stdin,
# stdout and stderr as file descriptors; what it gets back: the exit code, 4 bytes (negative: a signal).
# Text, because the shim holds a copy of it: the shim runs without this module (python -S, any folder).
SEND = r"""
def send_job(path, argv, env, cwd, timeout, fds):
    import json, socket, struct
    payload = json.dumps({"argv": argv, "env": env, "cwd": cwd, "timeout": timeout}).encode()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)
    socket.send_fds(connection, [struct.pack("!Q", len(payload)) + payload], fds)
    answer = b""
    while len(answer) < 4:
        chunk = connection.recv(4 - len(answer))
        if not chunk:
            raise ConnectionError("the script server closed the connection")
        answer += chunk
    connection.close()
    return struct.unpack("!i", answer)[0]
"""

SERVER = r"""
import gc, json, os, runpy, select, signal, socket, struct, sys, traceback
sys.path.insert(0, os.path.abspath("src"))
import albumentations, hydra, mlflow, pytorch_lightning, torch  # noqa: F401  the slow imports, once
import cnnlab.training.run, cnnlab.evaluation.evaluate, cnnlab.evaluation.ensemble  # noqa: F401
sys.path.pop(0)
gc.freeze()  # the children's collections skip what the imports made: scanning it took 0.5 s a run

def receive(connection):
    data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
    while len(data) < 8 or len(data) < 8 + struct.unpack("!Q", data[:8])[0]:
        data += connection.recv(1 << 16)
    return json.loads(data[8:]), fds

def run(job, fds):
    code = 1
    try:
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
            os.close(fd)
        os.chdir(job["cwd"])
        os.environ.clear(); os.environ.update(job["env"])
        signal.alarm(job["timeout"])
        sys.argv = job["argv"]
        # as `python dir/x.py` has it: the script's folder first (not the working directory), then PYTHONPATH
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

listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1]); listener.listen(16)
print("READY", flush=True)
running, serving = {}, True
while serving or running:
    readable, _, _ = select.select([listener, sys.stdin] if serving else [], [], [], 0.02)
    if sys.stdin in readable and not sys.stdin.readline():  # the test process is done: finish and stop
        serving = False
    if listener in readable:
        connection, _ = listener.accept()
        job, fds = receive(connection)
        pid = os.fork()
        if pid == 0:
            listener.close(); connection.close()
            run(job, fds)
        for fd in fds:
            os.close(fd)
        running[pid] = connection
    while running:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        connection = running.pop(pid, None)
        if connection is not None:
            connection.sendall(struct.pack("!i", os.waitstatus_to_exitcode(status)))
            connection.close()
"""

# `python` for the stages dvc runs: a script goes to the server, anything else (or no server) to the real one.
SHIM = r"""#!{python} -S
import os, sys
{send}
argv = sys.argv[1:]
if argv and argv[0].endswith(".py") and os.path.exists({socket!r}):
    try:
        code = send_job({socket!r}, argv, dict(os.environ), os.getcwd(), 3600, [0, 1, 2])
    except OSError:
        code = None
    if code is not None:
        if code < 0:  # the script died of a signal: so does this process
            os.kill(os.getpid(), -code)
        sys.exit(code if code >= 0 else 128 - code)
os.execv({python!r}, [{python!r}, *argv])
"""

namespace: dict = {}
exec(SEND, namespace)
send_job = namespace["send_job"]


class ScriptServer:
    """One server process (its runs in parallel: one connection each), and ``bin``: a folder whose
    ``python`` sends scripts to it, for the PATH of processes that start ours (dvc)."""

    def __init__(self, env: dict[str, str]):
        short = None if len(tempfile.gettempdir()) < 60 else "/tmp"  # a Unix socket's path holds 107 bytes at most
        self.folder = Path(tempfile.mkdtemp(prefix="script-server-", dir=short))
        self.socket, self.bin = str(self.folder / "socket"), self.folder / "bin"
        self.bin.mkdir()
        shim = self.bin / "python"
        shim.write_text(SHIM.format(python=sys.executable, send=SEND, socket=self.socket))
        shim.chmod(0o755)
        self.log = open(self.folder / "server.log", "w")
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, self.socket], cwd=ROOT, env=env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.lock, self.ready = threading.Lock(), False

    def wait(self) -> None:
        """Until the server has made its imports (seconds) and listens."""
        with self.lock:
            if not self.ready and self.process.stdout.readline().strip() != "READY":
                log = (self.folder / "server.log").read_text()
                raise RuntimeError(f"the script server did not start: {log[-3000:]}")
            self.ready = True

    def run(self, argv: list[str], env: dict[str, str], timeout: int, stdout: Path, stderr: Path,
            cwd: Path = ROOT) -> int:
        """Exit code of `python *argv` run in ``cwd``, its streams written to the two files (or one)."""
        self.wait()
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(stdout, "w"))
            err = out if stderr == stdout else files.enter_context(open(stderr, "w"))
            nothing = files.enter_context(open(os.devnull))
            code = send_job(self.socket, argv, env, str(cwd), timeout, [nothing.fileno(), out.fileno(), err.fileno()])
        if code == -signal.SIGALRM:
            raise subprocess.TimeoutExpired(["python", *argv], timeout)
        return code

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()
        for path in (self.bin / "python", self.folder / "server.log", Path(self.socket)):
            path.unlink(missing_ok=True)
        self.bin.rmdir()
        self.folder.rmdir()


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
