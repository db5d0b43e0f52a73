"""Measure the README's headline figures on this machine and print them as Markdown tables.

    .venv/bin/python scripts/readme_figures.py [work folder]      # ~10 min on 2 CPU cores

Floating-point results differ between CPUs (other vector instructions, other summation orders),
so a run that is exactly reproducible on one machine gives slightly other accuracies on another:
this script is how to get the figures for yours. It trains the default model, the two `augment`
rows of the README's table, and evaluates the first two with every test-time view (logger=none:
nothing goes to the project's MLflow store; the work folder holds data, runs and evaluations).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
AUGMENT_ROWS = {"`none` (the default)": [],
                "`light`: mirror + random crops of 85-100% of the area": ["augment=light"],
                "`light` with crops of 60-100% (`'augment.crop.scale=[0.6,1.0]'`)":
                    ["augment=light", "augment.crop.scale=[0.6,1.0]"]}
TTA = ["flip", "five_crop", "ten_crop"]


def run(script: str, *overrides: str) -> Path:
    """Run an entry script; returns the folder it wrote (the line that names it in its log)."""
    command = [sys.executable, f"src/{script}", *overrides, "logger=none"]
    print("$", " ".join(command[1:]), flush=True)
    output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    marker = "Best checkpoint: " if script == "train.py" else "Outputs: "
    line = next(line for line in output.splitlines() if line.startswith(marker))
    path = Path(line.removeprefix(marker))
    return path.parents[1] if script == "train.py" else path


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.system()}"


def main(work: Path) -> None:
    paths = f"paths.root_dir={work}"
    started = time.perf_counter()
    accuracy, tta = {}, {}
    for row, overrides in AUGMENT_ROWS.items():
        folder = run("train.py", paths, *overrides)
        accuracy[row] = json.loads((folder / "metrics.json").read_text())["test/acc"]
        if len(tta) < 2:  # the default run and augment=light
            best = folder / "checkpoints" / "best.ckpt"
            scores = {}
            for mode in TTA:
                metrics = json.loads((run("evaluate.py", paths, f"ckpt={best}", f"tta={mode}", *overrides)
                                      / "metrics.json").read_text())
                scores["none"], scores[mode] = metrics["none"]["acc"], metrics[mode]["acc"]
            tta[row.split(":")[0].split(" ")[0]] = scores
    print(f"\nMachine: {machine()}; {time.perf_counter() - started:.0f} s in all\n")
    print("| `augment` | test accuracy |\n|---|---|")
    for row, value in accuracy.items():
        print(f"| {row} | {100 * value:.1f}% |")
    print("\n| `tta` | `none` | " + " | ".join(f"`{m}`" for m in TTA) + " |\n|---|---|---|---|---|")
    for name, scores in tta.items():
        print(f"| {name} | " + " | ".join(f"{100 * scores[m]:.1f}%" for m in ["none", *TTA]) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cnnlab-figures-")))
