"""Every command in README.md and docs/*.md runs as written.

The commands are read from the documents themselves, so one added later is covered without touching
this file:

* code blocks (indented by four spaces, or fenced) are split into lines, a line into its commands
  (``a && b``, ``a; b``), and ``# comments`` are dropped;
* a block whose first line starts with a program (``python``, ``make``, ``dvc``, ``mlflow``,
  ``source``, ``git``, ``cd``, ``torchrun``, or anything else found on PATH) is a block of commands: each of its
  lines must be a command of a known program; a block with ``$ `` prompts has its commands on those
  lines and their output on the others; any other block is output (a log, a table, a tree);
* ``python src/<script>.py ...`` commands are RUN, from the project root, in a tiny setting: the
  overrides of ``conftest.tiny_overrides`` (a temporary ``paths.root_dir``, 64/32/32 images, one
  epoch, no workers) are appended, each only where the command's config has that key and the
  command does not set it itself (the command's own values always win) and never to enlarge a
  value; placeholders (``<run id>``, ``outputs/runs/<run>/...``, ``outputs/evaluate/<run a>``,
  ``members={...}``, ``ckpt=...``, ``/path/to/images``) become real artifacts of one tiny training
  and two tiny evaluations made first; an output the command writes next to itself
  (``cost.output=vgg16.csv``) goes to the temporary folder instead. After a ``$ `` prompt, the
  output shown must appear (and an ``Error:`` must exit with status 2); otherwise the exit status is 0;
* every other command is in REDUCED below: why it cannot run here and the smaller check done
  instead. A command that is neither fails ``test_every_command_in_the_docs_is_classified``, and so
  does an entry of REDUCED or PRINTED (output lines that read as commands) that the
  documents no longer hold. Identical commands in several places run once.

Speed (the whole file: about 1 minute on 2 idle cores, under 2 with other jobs): the scripts run in
processes forked from a server that imported torch, Lightning, MLflow and albumentations once (the
same argv, working directory and environment as ``python src/...``, half the CPU time), two at a
time, with one torch thread each. ``CNNLAB_TEST_PLAIN=1`` runs each as a plain ``python src/...``
process instead (about 3 minutes).
"""

from __future__ import annotations

import functools
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CONF_DIR, ROOT, script_env, script_server, tiny_overrides

pytestmark = pytest.mark.slow

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VENV_BIN = Path(sys.executable).parent
PROGRAMS = {"python", "make", "dvc", "mlflow", "source", "git", "cd", "torchrun"}
TIMEOUT = 180  # s for one command: each takes seconds


# --- extraction ------------------------------------------------------------------------------------

@dataclass
class Command:
    text: str                        # as written in the document (whitespace collapsed, comment dropped)
    where: list[str] = field(default_factory=list)  # file:line of each occurrence
    shown_output: tuple[str, ...] = ()  # what a `$ ` prompt block shows it printing


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced or indented (4 spaces, after a blank line) code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^ {0,3}(```+|~~~+)", line)
        if fence:
            start, body = i + 2, []
            i += 1
            while i < len(lines) and not lines[i].lstrip().startswith(fence.group(1)):
                body.append(lines[i])
                i += 1
            blocks.append((start, body))
        elif re.match(r"^( {4}|\t)", line) and line.strip() and (i == 0 or not lines[i - 1].strip()):
            start, body = i + 1, []
            while i < len(lines) and (not lines[i].strip() or re.match(r"^( {4}|\t)", lines[i])):
                body.append(lines[i][4:] if lines[i].startswith("    ") else lines[i][1:])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            blocks.append((start, body))
            continue
        i += 1
    return blocks


def shell_segments(line: str) -> list[str]:
    """The commands of one shell line: split at ``&&``, ``||`` and ``;`` outside quotes, comment dropped."""
    segments, current, quote, i = [], "", None, 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (not current or current[-1].isspace()):
            break
        elif line.startswith(("&&", "||"), i) or char == ";":
            segments.append(current)
            current = ""
            i += 1 if char == ";" else 2
            continue
        current += char
        i += 1
    segments.append(current)
    return [" ".join(s.split()) for s in segments if s.strip()]


def program_of(text: str) -> str:
    """The program a command runs: `.venv/bin/python` is `python`."""
    return Path(text.split()[0]).name if text.split() else ""


def looks_like_a_command(text: str) -> bool:
    program = program_of(text)
    if not program or not re.match(r"^[\w./~-]+$", program):
        return False
    first = text.split()[0]
    return (program in PROGRAMS or first.startswith("./")
            or shutil.which(program, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}") is not None)


@dataclass
class Extracted:
    commands: dict[str, Command]
    printed: dict[str, list[str]]    # output lines that look like commands -> where
    unclassified: list[str]          # "file:line: text: why"


def extract() -> Extracted:
    commands: dict[str, Command] = {}
    printed: dict[str, list[str]] = {}
    unclassified: list[str] = []

    def add(text: str, where: str, shown: tuple[str, ...] = ()) -> None:
        command = commands.setdefault(text, Command(text))
        command.where.append(where)
        command.shown_output = command.shown_output or shown

    for doc in DOCS:
        name = doc.relative_to(ROOT).as_posix()
        for start, body in code_blocks(doc.read_text()):
            numbered = [(start + k, line) for k, line in enumerate(body) if line.strip()]
            if not numbered:
                continue
            if any(line.startswith("$ ") for _, line in numbered):  # prompts: commands, then their output
                for k, (number, line) in enumerate(numbered):
                    if line.startswith("$ "):
                        shown = []
                        for _, after in numbered[k + 1:]:
                            if after.startswith("$ "):
                                break
                            shown.append(after.strip())
                        for segment in shell_segments(line[2:]):
                            add(segment, f"{name}:{number}", tuple(shown))
            elif looks_like_a_command(numbered[0][1]):  # a block of commands: every line must be one
                for number, line in numbered:
                    for segment in shell_segments(line):
                        if program_of(segment) in PROGRAMS:
                            add(segment, f"{name}:{number}")
                        else:
                            unclassified.append(f"{name}:{number}: {segment!r}: not a command of "
                                                f"{sorted(PROGRAMS)} in a block of commands")
            else:  # output: a line in it that reads as a command must be known as printed output
                for number, line in numbered:
                    text = " ".join(line.split())
                    if program_of(text) in PROGRAMS:
                        printed.setdefault(text, []).append(f"{name}:{number}")
    return Extracted(commands, printed, unclassified)


# --- what runs for real, and how ---------------------------------------------------------------------

@dataclass
class Artifacts:
    """What the placeholders stand for: one tiny training, its evaluations, a tiny image folder."""
    root: Path                       # paths.root_dir of every command
    run_dir: Path                    # outputs/runs/<run>
    run_id: str                      # its MLflow run
    evaluations: list[Path]          # outputs/evaluate/<a>, <b>
    images: Path                     # /path/to/images
    python: Callable[[list[str]], Result] | None = None  # runs `python <argv>` in the pool


PLACEHOLDERS: list[tuple[str, Callable[[Artifacts, re.Match], str]]] = [
    (r"outputs/runs/<run>", lambda a, m: str(a.run_dir)),
    (r"<(?:mlflow )?run id>", lambda a, m: a.run_id),
    (r"ckpt=\.\.\.", lambda a, m: f"ckpt={a.run_dir / 'checkpoints' / 'best.ckpt'}"),
    (r"/path/to/images", lambda a, m: str(a.images)),
]
MEMBERS = r"outputs/evaluate/<(?:run )?(\w+)>"  # each name its own evaluation folder, in order of appearance


def substitute(text: str, artifacts: Artifacts) -> str:
    """The command with its placeholders replaced by real artifacts; an unknown placeholder fails."""
    for pattern, value in PLACEHOLDERS:
        text = re.sub(pattern, functools.partial(value, artifacts), text)
    names: list[str] = []
    for name in re.findall(MEMBERS, text):
        names += [] if name in names else [name]
    folders = artifacts.evaluations
    text = re.sub(MEMBERS, lambda m: str(folders[names.index(m.group(1)) % len(folders)]), text)
    if "members={...}" in text:  # named as the command's weights= names them, or a and b
        weights = re.search(r"weights=\{([^}]*)\}", text)
        keys = [item.split(":")[0].strip() for item in weights.group(1).split(",")] if weights else ["a", "b"]
        members = ", ".join(f"{key}: {artifacts.evaluations[k % len(artifacts.evaluations)]}"
                            for k, key in enumerate(keys))
        text = text.replace("members={...}", f"members={{{members}}}")
    # an output the command writes beside itself goes to the temporary root instead of the project tree
    text = re.sub(r"\b(cost\.output|hydra\.run\.dir)=(?!/)([^\s'\"]+)", rf"\1={artifacts.root}/\2", text)
    left = re.findall(r"<[^<>]+>|\.\.\.", text)
    assert not left, f"{text}: unknown placeholder(s) {left}: add them to PLACEHOLDERS in {Path(__file__).name}"
    return text


HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
                          "--info", "-i"}


def overrides_of(args: list[str]) -> list[str]:
    result, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in HYDRA_FLAGS_WITH_VALUE
        else:
            result.append(arg)
    return result


def config_name_of(script: str) -> str:
    found = re.search(r"config_name=\"(\w+)\"", (ROOT / script).read_text())
    assert found, f"{script}: no @hydra.main(config_name=...)"
    return found.group(1)


_compose_lock = threading.Lock()


def tiny_setting(script: str, args: list[str], root: Path) -> list[str]:
    """The overrides of conftest.tiny_overrides that this command can take: each key must exist in its
    config, the command must not set it itself, and a value is never raised."""
    if script == "src/cost.py":  # nothing trained, nothing read, built on the meta device: as written
        return []
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parsed = OverridesParser.create().parse_overrides(overrides_of(args))
    own = {o.key_or_group for o in parsed if not (CONF_DIR / o.key_or_group).is_dir()}
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        with _compose_lock, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name_of(script), overrides=plain)
    except Exception:  # noqa: BLE001  the command itself is refused (`model=nope`): only keep it out of the tree
        return tiny_overrides(root)[:1]
    added = []
    for override in tiny_overrides(root):
        key, value = override.split("=", 1)
        if any(key == k or key.startswith(k + ".") for k in own):
            continue
        if OmegaConf.select(cfg, key, default="<absent>", throw_on_resolution_failure=False) == "<absent>":
            continue
        current = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        if isinstance(current, int) and value.isdigit() and current < int(value):
            continue
        added.append(override)
    return added


@dataclass
class Result:
    argv: list[str]
    returncode: int
    output: str
    seconds: float = 0.0

    def tail(self, chars: int = 4000) -> str:
        return f"$ {shlex.join(self.argv)}\n(exit {self.returncode}, {self.seconds:.1f} s)\n{self.output[-chars:]}"


def command_env() -> dict[str, str]:
    """conftest.script_env (only what the test sets reaches the scripts), without a run id or root of the
    test's own, and one torch thread per command: two commands run at once on two cores, and two threads each
    (torch's default there) made every tiny training 4x slower, the threads spinning against each other."""
    return {k: v for k, v in script_env({"OMP_NUM_THREADS": "1"}).items() if k not in ("CNNLAB_RUN_ID", "CNNLAB_ROOT")}


class Runner:
    """Runs `python src/<script>.py args` (conftest.script_server: forked from the script server, or plain),
    its output in one log file, as a terminal would show it."""

    def __init__(self, logs: Path, name: str):
        self.logs, self.name, self.count = logs, name, 0

    def python(self, argv: list[str]) -> Result:
        started = time.monotonic()
        self.count += 1
        log = self.logs / f"{self.name}-{self.count}.log"
        if script_server() is None:
            with log.open("w") as output:
                code = subprocess.run([sys.executable, *argv], check=False, cwd=ROOT, env=command_env(), stdout=output,
                                      stderr=subprocess.STDOUT, timeout=TIMEOUT, stdin=subprocess.DEVNULL).returncode
        else:
            code = script_server().run(argv, command_env(), TIMEOUT, log, log)
        return Result(["python", *argv], code, log.read_text(), time.monotonic() - started)


class Pool:
    """Two runners: two commands at a time (on the one script server, which imports in the background),
    from any thread."""

    def __init__(self, logs: Path, size: int = 2):
        script_server()  # started now: it imports while the store and the images are made
        self.runners: queue.Queue[Runner] = queue.Queue()
        for k in range(size):
            self.runners.put(Runner(logs, f"r{k}"))

    def python(self, argv: list[str]) -> Result:
        runner = self.runners.get()
        try:
            return runner.python(argv)
        except Exception as error:  # noqa: BLE001  a timeout, a server gone: that command's failure
            return Result(["python", *argv], -1, f"{type(error).__name__}: {error}")
        finally:
            self.runners.put(runner)


def run(argv: list[str]) -> Result:
    """A command other than our scripts, from the project root, with the venv first on PATH. Results of
    `--help` are shared (several checks ask the same program)."""
    result = _help(tuple(argv)) if argv[-1] == "--help" else _run(tuple(argv))
    return Result(result.argv, result.returncode, result.output, result.seconds)


def _run(argv: tuple[str, ...]) -> Result:
    started = time.monotonic()
    path = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(argv, check=False, cwd=ROOT, env=command_env() | {"PATH": path}, capture_output=True,
                          text=True, timeout=120)
    return Result(list(argv), done.returncode, done.stdout + done.stderr, time.monotonic() - started)


_help = functools.lru_cache(maxsize=None)(_run)


# --- commands that cannot run here, and what is checked instead ----------------------------------------

def options_of(command: str) -> list[str]:
    return [word.split("=")[0] for word in shlex.split(command) if word.startswith("-") and len(word) > 1]


def help_lists_options(*argv: str) -> Callable[[str, Artifacts], Result]:
    """`<program> --help` works and names every option the command uses (a Python script: run like ours)."""
    def check(command: str, artifacts: Artifacts) -> Result:
        result = artifacts.python([*argv[1:], "--help"]) if argv[0] == "python" else run([*argv, "--help"])
        missing = [o for o in options_of(command) if o not in result.output]
        if missing:
            result.returncode, result.output = 1, f"{result.output}\noptions not in the help: {missing}"
        return result
    return check


def make_dry_run(command: str, artifacts: Artifacts) -> Result:
    """`make -n <target> [VAR=value]`: the target exists and says what it would run."""
    words = shlex.split(command)
    result = run(["make", "-n", *words[1:]])
    wanted = [w.split("=", 1)[1] for w in words[1:] if "=" in w]
    if result.returncode == 0 and not all(w in result.output for w in wanted):
        result.returncode, result.output = 1, f"{result.output}\nthe recipe does not use {wanted}"
    return result


def hydra_cfg_job(command: str, artifacts: Artifacts) -> Result:
    """The config composes with the command's overrides (`--cfg job`: nothing runs, nothing downloads)."""
    words = shlex.split(command)
    result = run([sys.executable, *words[1:], f"paths.root_dir={artifacts.root}", "--cfg", "job"])
    values = [w.split("=", 1)[1] for w in overrides_of(words[2:])]
    if result.returncode == 0 and not all(v in result.output for v in values):
        result.returncode, result.output = 1, f"{result.output}\nnot all of {values} in the composed config"
    return result


def pipeline_params(command: str, artifacts: Artifacts) -> Result:
    """`dvc exp run -S key=value ...`: each -S override applies to conf/pipeline.yaml, as DVC composes it
    (every combination of a sweep); and `dvc exp run --help` lists the options."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    words = shlex.split(command)
    settings = [words[k + 1] for k, w in enumerate(words) if w in ("-S", "--set-param")]
    result = help_lists_options("dvc", "exp", "run")(command, artifacts)
    combinations: list[list[str]] = [[]]
    for override in OverridesParser.create().parse_overrides(settings):
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        combinations = [c + [f"{override.key_or_group}={v}"] for c in combinations for v in values]
    problems = []
    with _compose_lock, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("pipeline")
        for combination in combinations:
            for item in combination:
                if OmegaConf.select(base, item.split("=")[0], default="<absent>") == "<absent>":
                    problems.append(f"{item}: no such key in conf/pipeline.yaml")
            compose("pipeline", overrides=combination)
    if problems:
        result.returncode, result.output = 1, f"{result.output}\n" + "\n".join(problems)
    result.output += f"\n{len(combinations)} experiment(s)"
    return result


def figures_compose() -> Result:
    """scripts/readme_figures.py compiles, and each training and evaluation it runs composes."""
    import runpy

    from hydra import compose, initialize_config_dir

    script = runpy.run_path(str(ROOT / "scripts" / "readme_figures.py"), run_name="readme_figures")
    runs = [("config", rows) for rows in script["AUGMENT_ROWS"].values()]
    runs += [("evaluate", ["ckpt=x.ckpt", f"tta={mode}", *rows]) for rows in script["AUGMENT_ROWS"].values()
             for mode in script["TTA"]]
    with _compose_lock, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name, overrides in runs:
            compose(name, overrides=[*overrides, "logger=none"])
    return Result(["compose"], 0, f"{len(runs)} configs compose")


def sweep_jobs_compose(command: str, artifacts: Artifacts) -> Result:
    """A sweep that cannot run here (on SLURM, against a server): every job's config composes, launcher and
    sweeper included, with each override's value in it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    words = shlex.split(command)
    combinations: list[list[str]] = [[]]
    for override in OverridesParser.create().parse_overrides(overrides_of(words[2:])):
        values = ([f"{override.key_or_group}={v}" for v in override.sweep_string_iterator()]
                  if override.is_sweep_override() else [override.input_line])
        combinations = [c + [v] for c in combinations for v in values]
    problems = []
    with _compose_lock, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combination in combinations:
            cfg = compose(config_name_of(words[1]), overrides=[*combination, f"paths.root_dir={artifacts.root}"],
                          return_hydra_config=True)
            for item in combination:
                key, value = item.split("=", 1)
                if "/" not in key and not (CONF_DIR / key).is_dir() and str(OmegaConf.select(cfg, key)) != value:
                    problems.append(f"{item}: the composed config has {OmegaConf.select(cfg, key)}")
    return Result(["compose"], 1 if problems else 0, "\n".join(problems) or f"{len(combinations)} job configs compose")


def fewer_trials(command: str, artifacts: Artifacts) -> Result:
    """A hyper-parameter search as written, with two trials in the tiny setting."""
    args = [w for w in shlex.split(command)[1:] if not w.startswith("hydra.sweeper.n_trials=")]
    args.append("hydra.sweeper.n_trials=2")
    return artifacts.python([*args, *tiny_setting(args[0], args[1:], artifacts.root)])


def tracked(*paths: str) -> Callable[[str, Artifacts], Result]:
    """A fresh clone has these (git tracks them)."""
    return lambda command, artifacts: run(["git", "ls-files", "--error-unmatch", *paths])


def shell(line: str) -> Callable[[str, Artifacts], Result]:
    return lambda command, artifacts: run(["bash", "-c", line])


def launched(check: Callable[[str, Artifacts], Result]) -> Callable[[str, Artifacts], Result]:
    """A launcher's command (``torchrun ... src/train.py overrides``): ``check`` on ``python src/train.py overrides``."""
    def check_launched(command: str, artifacts: Artifacts) -> Result:
        words = shlex.split(command)
        script = next(i for i, word in enumerate(words) if word.startswith("src/"))
        return check(shlex.join(["python", *words[script:]]), artifacts)
    return check_launched


def nothing(command: str, artifacts: Artifacts) -> Result:
    return Result([], 0, "")


@dataclass
class Reduced:
    reason: str
    check: Callable[[str, Artifacts], Result]


TEST_SUITE = "runs the test suite that holds this test (minutes, and it would run itself)"
REDUCED: dict[str, Reduced] = {
    "make train": Reduced("trains the default model for 2 minutes; `python src/train.py` runs here, tiny",
                          make_dry_run),
    "make test": Reduced(TEST_SUITE, make_dry_run),
    "make test-fast": Reduced(TEST_SUITE, make_dry_run),
    'make test ARGS="-k mlflow -x"': Reduced(TEST_SUITE, make_dry_run),
    "make lock": Reduced("rewrites constraints.txt, a tracked file", make_dry_run),
    "make setup": Reduced("installs packages (no internet here; the venv exists)", make_dry_run),
    "make ui": Reduced("serves the MLflow UI until stopped", make_dry_run),
    "make study NAME=residual_vs_plain": Reduced(
        "a study's default run takes minutes (tests/test_study_*.py run each study tiny with real `dvc repro`)",
        make_dry_run),
    "source .venv/bin/activate": Reduced(
        "changes only the shell it runs in: checked that it puts the venv's python, dvc and mlflow first",
        shell("source .venv/bin/activate && for p in python dvc mlflow; do "
              "[ \"$(command -v $p)\" = \"$VIRTUAL_ENV/bin/$p\" ] || { echo $p: $(command -v $p); exit 1; }; done")),
    "dvc repro": Reduced("the whole pipeline takes minutes (tests/test_pipeline.py runs a tiny one with real "
                         "`dvc repro`): dvc.yaml is read and its stages listed",
                         lambda command, artifacts: run(["dvc", "stage", "list"])),
    "dvc metrics show": Reduced("needs the pipeline's results: the command and its options exist",
                                help_lists_options("dvc", "metrics", "show")),
    "dvc metrics diff": Reduced("needs the pipeline's results: the command and its options exist",
                                help_lists_options("dvc", "metrics", "diff")),
    "dvc plots show": Reduced("writes dvc_plots/ into the project from the DVC cache: the command exists",
                              help_lists_options("dvc", "plots", "show")),
    "dvc exp show --only-changed": Reduced("needs experiments: the command and its options exist",
                                           help_lists_options("dvc", "exp", "show")),
    "dvc exp run --run-all": Reduced("runs queued pipelines (minutes): the option exists",
                                     help_lists_options("dvc", "exp", "run")),
    "dvc exp run -S members.b.freeze=stages -S members.b.lr=0.0005": Reduced(
        "a pipeline run (minutes): the -S overrides compose onto conf/pipeline.yaml", pipeline_params),
    "dvc exp run -S evaluate.tta=ten_crop": Reduced(
        "a pipeline run (minutes): the -S overrides compose onto conf/pipeline.yaml", pipeline_params),
    "dvc exp run -S 'members.a.model=resnet18' -S members.a.pretrained=false": Reduced(
        "a pipeline run (minutes): the -S overrides compose onto conf/pipeline.yaml", pipeline_params),
    "dvc exp run --queue -S 'members.b.seed=range(1,4)' -S evaluate.tta=flip,ten_crop": Reduced(
        "queues six pipeline runs: the sweep's combinations compose onto conf/pipeline.yaml", pipeline_params),
    "git clone <this repository> cnnlab": Reduced(
        "a clone of the project: it holds what the walkthrough runs next",
        tracked("Makefile", "pyproject.toml", "constraints.txt", "dvc.yaml", "params.yaml", "conf/pipeline.yaml")),
    "cd cnnlab": Reduced("the folder of the clone above", nothing),
    "git add dvc.lock results": Reduced("would stage files in this checkout: both are tracked",
                                        tracked("dvc.lock", "results")),
    'git commit -m "Pipeline results"': Reduced("would commit in this checkout", nothing),
    "python benchmarks/shapes_generation.py --image-size 32 64 128": Reduced(
        "a benchmark (minutes, by design): its options exist",
        help_lists_options("python", "benchmarks/shapes_generation.py")),
    "python benchmarks/data_throughput.py": Reduced(
        "a benchmark (minutes, by design): it starts", help_lists_options("python", "benchmarks/data_throughput.py")),
    "python benchmarks/cached_features.py": Reduced(
        "a benchmark (minutes, by design): it starts", help_lists_options("python", "benchmarks/cached_features.py")),
    "python src/train.py model=resnet50 model.pretrained=https://download.pytorch.org/models/resnet50-11ad3fa6.pth":
        Reduced("downloads ImageNet weights (no internet here): the config composes with these overrides",
                hydra_cfg_job),
    "python src/train.py model=googlenet model.pretrained=imagenet data=imagefolder data.source.root=/path/to/images":
        Reduced("downloads ImageNet weights (no internet here): the config composes with these overrides",
                hydra_cfg_job),
    "mlflow models serve -m models:/cnnlab-resnet_small/1 --env-manager local --host 127.0.0.1 --port 5001": Reduced(
        "serves until stopped (tests/test_inference.py serves a registered model for real): its options exist",
        help_lists_options("mlflow", "models", "serve")),
    "python benchmarks/cpu_latency.py": Reduced(
        "a benchmark (minutes, by design): it starts", help_lists_options("python", "benchmarks/cpu_latency.py")),
    "python src/train.py -m hparams_search=shapes_optuna": Reduced(
        "20 trials: the search runs as written with two", fewer_trials),
    "python src/train.py -m hparams_search=shapes_optuna hydra.sweeper.n_trials=40 model=resnet18": Reduced(
        "40 trials: the search runs as written with two", fewer_trials),
    "python src/train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu model=resnet18,resnet50 seed=1,2,3":
        Reduced("needs a SLURM cluster (tests/test_sweeps.py renders the sbatch script): every job's config "
                "composes", sweep_jobs_compose),
    "python src/train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 "
    "trainer=gpu model=resnet18,resnet50 seed=1,2,3": Reduced(
        "needs a SLURM cluster with GPUs: every job's config composes", sweep_jobs_compose),
    "python -m pip install -c constraints.txt -e '.[slurm]'": Reduced(
        "installs packages: the slurm extra exists, names the submitit launcher, and the launcher is installed "
        "(the dev extra has it too)",
        shell("python -c \"import tomllib; extra = tomllib.load(open('pyproject.toml', 'rb'))['project']"
              "['optional-dependencies']['slurm']; assert any(r.startswith('hydra-submitit-launcher') for r in extra); "
              "import hydra_plugins.hydra_submitit_launcher, submitit\" && grep -q '^submitit==' constraints.txt")),
    "mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db --artifacts-destination "
    "mlartifacts": Reduced("serves until stopped (tests/test_training.py tracks to a real server): its options exist",
                           help_lists_options("mlflow", "server")),
    "python src/train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=4 tracking_uri=http://127.0.0.1:5000 "
    "seed=1,2,3,4": Reduced("needs the server above: every job's config composes", sweep_jobs_compose),
    "python benchmarks/train_throughput.py --models resnet50 efficientnet_b0 --sizes 128": Reduced(
        "a benchmark (minutes, by design): its options exist", help_lists_options("python", "benchmarks/train_throughput.py")),
    "python benchmarks/prepare_throughput.py": Reduced(
        "a benchmark (minutes, by design): it starts", help_lists_options("python", "benchmarks/prepare_throughput.py")),
    "python benchmarks/overhead.py --threads 1 --clock process --skip-startup": Reduced(
        "a benchmark (minutes, by design): its options exist", help_lists_options("python", "benchmarks/overhead.py")),
    "python benchmarks/overhead.py --skip-loop": Reduced(
        "a benchmark (minutes, by design): its options exist", help_lists_options("python", "benchmarks/overhead.py")),
    "python benchmarks/overhead.py --skip-loop --train-overrides trainer.num_sanity_val_steps=2": Reduced(
        "a benchmark (minutes, by design): its options exist", help_lists_options("python", "benchmarks/overhead.py")),
    "python benchmarks/trainer_throughput.py --models resnet50 efficientnet_b0 --size 224 --batch 256 --images 2048 "
    "--compile off": Reduced("a GPU benchmark: its options exist",
                             help_lists_options("python", "benchmarks/trainer_throughput.py")),
    "python benchmarks/trainer_throughput.py --models resnet50 efficientnet_b0 --size 224 --batch 256 --images 2048 "
    "--compile on": Reduced("a GPU benchmark: its options exist",
                            help_lists_options("python", "benchmarks/trainer_throughput.py")),
    "python src/train.py trainer=gpu model=resnet50 data=imagefolder data.source.root=/path/to/images": Reduced(
        "needs a CUDA GPU: the config composes with these overrides", hydra_cfg_job),
    "python src/train.py trainer=gpu trainer.compile=true model=efficientnet_b0": Reduced(
        "needs a CUDA GPU: the config composes with these overrides", hydra_cfg_job),
    "python src/train.py trainer=ddp trainer.devices=4 trainer.sync_batchnorm=true model=resnet50": Reduced(
        "needs four CUDA GPUs: the config composes with these overrides", hydra_cfg_job),
    "torchrun --nnodes=2 --nproc-per-node=8 --node-rank=0 --master-addr=10.0.0.1 --master-port=29500 "
    "--rdzv-id=resnet50-a src/train.py trainer=ddp trainer.num_nodes=2 trainer.devices=8 model=resnet50": Reduced(
        "needs two machines of eight GPUs (tests/test_scaling.py runs two torchrun launches on CPU): the "
        "launched command's config composes", launched(hydra_cfg_job)),
    ".venv/bin/python scripts/readme_figures.py": Reduced(
        "measures the README's figures (10 minutes): it compiles, and every run it makes composes",
        lambda command, artifacts: figures_compose()),
}

# Output lines that read as commands: printed by a command above, not run from the documents.
PRINTED = {
    "python src/train.py trainer.max_epochs=30 resume=outputs/runs/2026-11-25_22-41-07_5d1c2a":
        "printed by a run that stopped early (tests/test_resume.py runs such a command)",
    "/path/to/cnnlab/.venv/bin/mlflow ui --backend-store-uri sqlite:////path/to/cnnlab/mlflow.db --host 127.0.0.1 "
    "--port 5000":
        "printed by `make train` (what `make ui` runs)",
}


def runs_for_real(text: str) -> bool:
    words = text.split()
    return (text not in REDUCED and len(words) >= 2 and program_of(text) == "python"
            and re.fullmatch(r"src/\w+\.py", words[1]) is not None and (ROOT / words[1]).is_file())


EXTRACTED = extract()
REAL = [c for c in EXTRACTED.commands.values() if runs_for_real(c.text)]
REDUCED_FOUND = [c for c in EXTRACTED.commands.values() if c.text in REDUCED]


def test_every_command_in_the_docs_is_classified():
    problems = list(EXTRACTED.unclassified)
    for command in EXTRACTED.commands.values():
        if not runs_for_real(command.text) and command.text not in REDUCED:
            problems.append(f"{', '.join(command.where)}: {command.text!r}: neither `python src/<script>.py ...` "
                            f"(run for real) nor in REDUCED: add it to REDUCED in {Path(__file__).name} with "
                            f"the reason and a reduced check")
    for text in EXTRACTED.printed:
        if text not in PRINTED:
            problems.append(f"{', '.join(EXTRACTED.printed[text])}: {text!r} reads as a command inside output: "
                            f"add it to PRINTED (or make it a command block)")
    problems += [f"REDUCED: {text!r} is no longer in the documents" for text in REDUCED
                 if text not in EXTRACTED.commands]
    problems += [f"PRINTED: {text!r} is no longer in the documents" for text in PRINTED
                 if text not in EXTRACTED.printed]
    assert not problems, "\n".join(problems)
    assert len(REAL) >= 20 and len(REDUCED_FOUND) >= 20  # the extraction still finds the documents' commands


# --- running them ---------------------------------------------------------------------------------------

def make_image_folder(root: Path) -> Path:
    """Two classes of ten small PNGs, one folder each: the `root/<class>/...` layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 128, (40, 48, 3)) + 127 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def needs_artifacts(text: str) -> bool:
    return bool(re.search(r"<[^<>]+>|\.\.\.", text))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[str, Result]]:
    """Every command run once, two at a time: those without placeholders at once, beside one tiny
    training and two evaluations of it; then those that need these; then the reduced checks.
    command text -> (what ran, its result)."""
    root = tmp_path_factory.mktemp("docs")
    logs = root / "logs"
    logs.mkdir()
    pool = Pool(logs)
    from mlflow.tracking import MlflowClient

    # one store for every command, made before any of them starts (two processes creating it at once race)
    MlflowClient(f"sqlite:///{root / 'mlflow.db'}").create_experiment(
        "cnnlab", artifact_location=(root / "mlartifacts").resolve().as_uri())
    images = make_image_folder(root / "images")
    tiny = tiny_overrides(root)
    artifacts_ready: Future = Future()

    def make_artifacts() -> None:
        try:
            import torch

            run_dir = root / "outputs" / "runs" / "tiny"
            trained = pool.python(["src/train.py", *tiny, f"hydra.run.dir={run_dir}"])
            assert trained.returncode == 0, trained.tail()
            run_id = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu",
                                weights_only=True)["mlflow_run_id"]
            evaluations = [root / "outputs" / "evaluate" / name for name in ("a", "b")]
            with ThreadPoolExecutor(2) as both:
                for evaluated in both.map(pool.python, [
                        ["src/evaluate.py", f"ckpt=runs:/{run_id}", *tiny, f"hydra.run.dir={evaluations[0]}"],
                        ["src/evaluate.py", f"ckpt={run_dir}/checkpoints/best.ckpt", "tta=flip", *tiny,
                         f"hydra.run.dir={evaluations[1]}"]]):
                    assert evaluated.returncode == 0, evaluated.tail()
            artifacts_ready.set_result(Artifacts(root, run_dir, run_id, evaluations, images, pool.python))
        except BaseException as error:  # noqa: BLE001  every command that needs them reports it
            artifacts_ready.set_exception(error)

    def real(command: Command) -> tuple[str, Result]:
        try:
            artifacts = (artifacts_ready.result() if needs_artifacts(command.text)
                         else Artifacts(root, Path("<run>"), "<run id>", [], images))
            args = shlex.split(substitute(command.text, artifacts))[1:]
            argv = [*args, *tiny_setting(args[0], args[1:], root)]
        except Exception as error:  # noqa: BLE001  reported by the command's own test
            return command.text, Result([], -1, f"{type(error).__name__}: {error}")
        return shlex.join(["python", *argv]), pool.python(argv)

    def reduced(command: Command) -> tuple[str, Result]:
        entry = REDUCED[command.text]
        try:
            return entry.reason, entry.check(command.text, Artifacts(root, Path(), "", [], images, pool.python))
        except Exception as error:  # noqa: BLE001
            return entry.reason, Result([], -1, f"{type(error).__name__}: {error}")

    fixture = threading.Thread(target=make_artifacts)
    fixture.start()
    # beside the fixture's training: what needs nothing of it, the longest first (a sweep, then trainings)
    order = sorted(REAL, key=lambda c: (needs_artifacts(c.text), " -m " not in f" {c.text} ",
                                        "train.py" not in c.text))
    with ThreadPoolExecutor(2) as lanes:
        done = list(lanes.map(real, order)) + list(lanes.map(reduced, REDUCED_FOUND))
    fixture.join()
    results = dict(zip([c.text for c in [*order, *REDUCED_FOUND]], done))
    (logs / "times.txt").write_text("".join(f"{r.seconds:6.1f} s  {text}\n" for text, (_, r) in results.items()))
    return results


def describe(command: Command) -> str:
    return f"{command.text}  ({', '.join(command.where)})"


@pytest.mark.parametrize("command", REAL, ids=lambda c: c.text[:90])
def test_command_runs_as_written(command, outcomes):
    ran, result = outcomes[command.text]
    where = f"{describe(command)}\nran: {ran}\n{result.tail()}"
    if command.shown_output:  # the documents show what it prints: that must come out
        shown = [line for line in command.shown_output if line != "..."]
        missing = [line for line in shown if line not in result.output]
        assert not missing, f"the documents show {missing}, which it did not print:\n{where}"
        if shown[0].startswith("Error: "):
            assert result.returncode == 2, where
    else:
        assert result.returncode == 0, where


@pytest.mark.parametrize("command", REDUCED_FOUND, ids=lambda c: c.text[:90])
def test_reduced_check_of_a_command_that_cannot_run_here(command, outcomes):
    reason, result = outcomes[command.text]
    assert result.returncode == 0, f"{describe(command)}\nnot run as written: {reason}\n{result.tail()}"
