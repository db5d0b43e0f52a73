"""Lightning's step overhead against a plain PyTorch loop, and the start-up times of src/train.py.

    python benchmarks/overhead.py [--model resnet_small] [--batch 64] [--size 32] [--steps 60] [--warmup 10]
        [--repeats 5] [--threads 1 --clock process] [--startup-repeats 3] [--skip-loop] [--skip-startup]

1. Step overhead (goal: under 5% at batch 64, 32 px, CPU). The same ImageClassifier (the project's
   LightningModule, model and optimizer from conf/, no scheduler) trains the same uint8 batches
   (random pixels, held in memory, one DataLoader without workers) for the same number of steps in
   three ways, interleaved, each starting from the same weights:
     - ``lightning``: a real ``pl.Trainer`` (CPU, logging, checkpointing, progress bar, model
       summary and validation off), so ``training_step`` runs with its metric updates and ``self.log``;
     - ``loop``: a hand-written loop doing what ``training_step`` computes (normalise, forward,
       cross-entropy, the torchmetrics update) then backward, optimizer step, zero_grad;
     - ``bare``: the same loop without the metric update (what the metrics cost).
   Each run is timed from the start of step ``--warmup`` to the end of the last step; the table
   gives medians over ``--repeats`` and lightning/loop - 1 as the overhead.
2. ``python src/train.py --help``: wall time of the whole process (goal: under 2 s).
3. ``python src/train.py``: from just before the process is started to the end of the first
   optimizer step (goal: under 8 s), stamped by the callback below (added with
   ``+callbacks.first_step=...``), which then ends the process. The run is the default one (its
   model, data, MLflow logger) in a temporary root whose data cache and MLflow store an untimed
   first run prepared.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
STAMP_ENV = "CNNLAB_FIRST_STEP_STAMP"
# "process": this process's CPU seconds, which other jobs on a shared machine do not stretch (use
# with --threads 1: with more, threads waiting for each other count too)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock = CLOCKS["wall"]


class FirstStepStamp(pl.Callback):
    """Writes the wall-clock time at the end of the first training batch (after its optimizer step) and exits."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Path(os.environ[STAMP_ENV]).write_text(repr(time.time()))
        sys.stdout.flush()
        os._exit(0)  # the rest of the run is not what is measured


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = clock()


def make_module(model: str, classes: int):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cnnlab.training.module import ImageClassifier

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return ImageClassifier(model=plain(cfg.model), classes=[str(i) for i in range(classes)],
                           optimizer=plain(cfg.optimizer), scheduler=None)


def run_lightning(module, loader, warmup: int) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    return timer.end - timer.start


def run_loop(module, loader, warmup: int, metrics: bool) -> float:
    import torch

    module.train()
    optimizer = module.configure_optimizers()
    start = None
    for i, (images, labels) in enumerate(loader):
        if i == warmup:
            start = clock()
        logits = module(images)
        loss = module.criterion(logits, labels)
        if metrics:  # what training_step adds: the metric updates (and the loss mean, where the module keeps one)
            module.train_metrics.update(logits.detach(), labels)
            if hasattr(module, "losses"):
                module.losses["train"].update(loss.detach(), weight=len(labels))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    end = clock()
    return end - start


def step_overhead(args) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    n = args.batch * args.steps
    images = torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch, shuffle=False, num_workers=0)
    template = make_module(args.model, 10)
    times = {"lightning": [], "loop": [], "bare": []}
    timed = args.steps - args.warmup
    for r in range(args.repeats):
        for kind in times:  # interleaved
            module = copy.deepcopy(template)
            if kind == "lightning":
                seconds = run_lightning(module, loader, args.warmup)
            else:
                seconds = run_loop(module, loader, args.warmup, metrics=kind == "loop")
            times[kind].append(seconds / timed * 1000)
            print(f"repeat {r + 1}: {kind} {times[kind][-1]:.1f} ms/step", flush=True)
    return {kind: statistics.median(v) for kind, v in times.items()} | {"all": times}


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def startup(args) -> dict:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONWARNINGS": "ignore"}
    train = [sys.executable, str(ROOT / "src" / "train.py")]
    helps, help_cpus, first_cpus = [], [], []
    subprocess.run(train + ["--help"], cwd=ROOT, env=env, capture_output=True, check=True)  # warm file cache
    for _ in range(args.startup_repeats):
        start, cpu = time.perf_counter(), child_cpu()
        subprocess.run(train + ["--help"], cwd=ROOT, env=env, capture_output=True, check=True)
        helps.append(time.perf_counter() - start)
        help_cpus.append(child_cpu() - cpu)
        print(f"--help: {helps[-1]:.2f} s ({help_cpus[-1]:.2f} CPU s)", flush=True)

    firsts = []
    with tempfile.TemporaryDirectory() as tmp:
        stamp = Path(tmp) / "stamp"
        overrides = [f"paths.root_dir={tmp}", "+callbacks.first_step._target_=overhead.FirstStepStamp",
                     *args.train_overrides]
        env = {**env, STAMP_ENV: str(stamp), "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "benchmarks"), str(ROOT / "src"), env.get("PYTHONPATH", "")])}
        for i in range(args.startup_repeats + 1):  # the first prepares the data cache and the MLflow store
            stamp.unlink(missing_ok=True)
            start, cpu = time.time(), child_cpu()
            done = subprocess.run(train + overrides, cwd=ROOT, env=env, capture_output=True, text=True)
            cpu = child_cpu() - cpu
            if not stamp.exists():
                sys.exit(f"no first step stamped (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            seconds = float(stamp.read_text()) - start
            print(f"first step{' (prepares the cache, untimed)' if i == 0 else ''}: {seconds:.2f} s "
                  f"({cpu:.2f} CPU s in the main process)", flush=True)
            if i:
                firsts.append(seconds)
                first_cpus.append(cpu)
    return {"help": statistics.median(helps), "help_cpu": statistics.median(help_cpus),
            "first": statistics.median(firsts), "first_cpu": statistics.median(first_cpus)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps of each run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--startup-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the step overhead")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="step overhead timed by wall time or by this process's CPU time (start-up: wall)")
    parser.add_argument("--train-overrides", nargs="*", default=[],
                        help="extra overrides for the first-step runs (e.g. logger=none), to see what costs what")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args()

    import torch

    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}, Lightning {pl.__version__}, Python {platform.python_version()}, "
          f"{datetime.date.today()}", flush=True)
    rows = []
    if not args.skip_loop:
        s = step_overhead(args)
        overhead = s["lightning"] / s["loop"] - 1
        print(f"\n{args.model}, batch {args.batch}, {args.size} px, {args.steps - args.warmup} timed steps after "
              f"{args.warmup}, median of {args.repeats} interleaved runs, {args.clock} clock\n")
        print("| Lightning ms/step | loop ms/step | bare loop ms/step | Lightning overhead | metrics' share |")
        print("|---:|---:|---:|---:|---:|")
        print(f"| {s['lightning']:.1f} | {s['loop']:.1f} | {s['bare']:.1f} | {overhead:+.1%} | "
              f"{s['loop'] / s['bare'] - 1:+.1%} |")
        rows.append(("Lightning step overhead (batch 64, 32 px)", "< 5%", f"{overhead:+.1%}", overhead < 0.05))
    if not args.skip_startup:
        s = startup(args)
        rows.append(("`python src/train.py --help`", "< 2 s", f"{s['help']:.2f} s ({s['help_cpu']:.2f} CPU s)",
                     s["help"] < 2))
        rows.append(("`python src/train.py` to the end of the first step", "< 8 s",
                     f"{s['first']:.2f} s ({s['first_cpu']:.2f} CPU s)", s["first"] < 8))
    print("\n| measure | goal | median | holds |\n|---|---|---:|---|")
    for name, goal, value, holds in rows:
        print(f"| {name} | {goal} | {value} | {'yes' if holds else 'no'} |")


if __name__ == "__main__":
    main()
