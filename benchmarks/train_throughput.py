"""Training throughput (images/s) of our models against the reference implementations, side by side.

    python benchmarks/train_throughput.py [--models resnet50 efficientnet_b0] [--sizes 224 128]
        [--batch 16] [--repeats 3] [--steps 3] [--modes eager channels_last compile channels_last+compile]
        [--optimizer sgd|adamw] [--impls single foreach fused] [--device cpu|cuda] [--threads 1 --clock process] [--profile]

One training step = uint8 -> float normalisation of a synthetic batch, forward, cross-entropy
against fixed labels, backward, optimizer step. For every model, size and mode our model (built
from conf/model/<name>.yaml by the project's own builder, as training builds it) and, where timm
or torchvision can be imported, the reference implementation of the same architecture are timed
in this one process, interleaved (ours, reference, ours, reference, ...); each repeat times
``--steps`` steps after a warm-up, and the table gives the median over ``--repeats``, the ratio
ours/reference of those medians, and the ratio of each side's fastest repeat (on a shared machine
other processes only ever slow a repeat down, so the fastest is the least disturbed).

References (the same architecture, the same parameter count): timm's ``vgg16``, ``resnet50``,
``mobilenetv1_100``, ``mobilenetv2_100`` and ``efficientnet_b0`` (with torchvision's stochastic
depth rate 0.2, as ours), torchvision's ``googlenet`` (timm has none); ``--reference torchvision``
takes torchvision's model wherever it has one (the zoo's tests compare logits against those).

Achieved FLOP/s: a training step is counted as 3x the forward's FLOPs (torch's FlopCounterMode:
convolutions and matrix products), divided by the step time, and given as a fraction of what a
large matrix product reaches on the same device in the same process (fp32 2048x2048 on CPU,
bf16 8192x8192 on CUDA, measured first and after each model; the highest is the peak).

On CUDA (``--device cuda``) the step runs under bf16 autocast and is timed between
synchronisations. Only ``cnnlab.models`` is imported from the project (with hydra-core and
omegaconf to compose conf/model/<name>.yaml), so the script runs wherever torch does.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing cnnlab

MODELS = ["vgg16", "resnet50", "googlenet", "mobilenet_v1", "mobilenet_v2", "efficientnet_b0"]
MODES = ["eager", "channels_last", "compile", "channels_last+compile"]
TIMM_NAMES = {"vgg16": "vgg16", "resnet50": "resnet50", "mobilenet_v1": "mobilenetv1_100",
              "mobilenet_v2": "mobilenetv2_100", "efficientnet_b0": "efficientnet_b0"}
TIMM_OPTIONS = {"efficientnet_b0": {"drop_rate": 0.2, "drop_path_rate": 0.2}}  # ours (and torchvision's) rates


def build_ours(name: str) -> nn.Module:
    """Our model as training builds it: conf/model/<name>.yaml (with scaling=none, training's default)
    composed by Hydra and instantiated, i.e. built by ``cnnlab.models.build_net``. Only the two groups
    the model reads are composed, so nothing else of conf/ (or of cnnlab) is needed."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}", "+scaling=none"])
    return instantiate(cfg.model, num_classes=1000)


def build_reference(name: str, prefer: str) -> tuple[nn.Module, str] | None:
    """The reference implementation of the same architecture, or None when neither library is here."""
    try:
        import torchvision.models as tv
    except ImportError:
        tv = None
    try:
        import timm
    except ImportError:
        timm = None
    tv_makers = {"vgg16": lambda: tv.vgg16(), "resnet50": lambda: tv.resnet50(),
                 "googlenet": lambda: tv.googlenet(aux_logits=False, transform_input=False, init_weights=True),
                 "mobilenet_v2": lambda: tv.mobilenet_v2(), "efficientnet_b0": lambda: tv.efficientnet_b0()}
    if timm is not None and name in TIMM_NAMES and (prefer == "timm" or tv is None or name not in tv_makers):
        timm_name = TIMM_NAMES[name]
        return timm.create_model(timm_name, pretrained=False, **TIMM_OPTIONS.get(name, {})), f"timm {timm_name}"
    if tv is not None and name in tv_makers:
        return tv_makers[name](), f"torchvision {name}"
    return None


def forward_flops(model: nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass (2 per multiply-add), counted on a weightless copy."""
    meta = copy.deepcopy(model).to("meta").train()
    with FlopCounterMode(display=False) as counter:
        meta(torch.empty(2, 3, size, size, device="meta"))  # batch 2: BatchNorm in training needs > 1
    return counter.get_total_flops() / 2  # per image


# "process": CPU seconds of this process, which other processes' load does not stretch (with one
# torch thread; with more, threads waiting for each other count too). For a shared machine.
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def gemm_peak(device: str, repeats: int = 5, clock=time.perf_counter) -> float:
    """FLOP/s of a large matrix product: fp32 2048^2 on CPU, bf16 8192^2 on CUDA (best of ``repeats``)."""
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    inner = 3 if device == "cpu" else 50
    best = 0.0
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        start = clock()
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n ** 3 * inner / (clock() - start))
    return best


def busy_fraction(seconds: float = 0.25) -> float:
    """How busy all the cores were over ``seconds`` (Linux /proc/stat; 0 elsewhere)."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (at most ``max_wait`` s) until other processes leave the CPU idle; returns the last busy fraction.

    Timings on a shared machine are only comparable when nothing else runs; this keeps a repeat from
    starting while another job holds the cores (interleaving and the median handle what remains)."""
    deadline = time.monotonic() + max_wait
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = busy_fraction()
    return busy


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_optimizer(params, kind: str, impl: str) -> torch.optim.Optimizer:
    """The project's optimizers (conf/optimizer/*.yaml) with the chosen implementation."""
    flags = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim > 1]}, {"params": [p for p in params if p.ndim <= 1],
                                                              "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4, **flags)
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05, **flags)


class Runner:
    """One model in one mode: its optimizer, a fixed uint8 batch and labels, and a timed step."""

    def __init__(self, model: nn.Module, mode: str, args: argparse.Namespace, size: int, impl: str):
        self.device, self.args = args.device, args
        self.channels_last = "channels_last" in mode
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(args.device, memory_format=fmt).train()
        self.optimizer = make_optimizer(self.model.parameters(), args.optimizer, impl)
        self.step_model = torch.compile(self.model) if "compile" in mode else self.model
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=g)
        self.images = images.to(args.device, memory_format=fmt)
        self.labels = (torch.arange(args.batch) * 37 % 1000).to(args.device)
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=args.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor([0.229, 0.224, 0.225], device=args.device).view(1, 3, 1, 1) * 255
        self.criterion = nn.CrossEntropyLoss()

    def step(self) -> None:
        x = (self.images.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.args.bf16):
            loss = self.criterion(self.step_model(x), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def images_per_s(self, steps: int) -> float:
        clock = CLOCKS[self.args.clock]
        sync(self.device)
        start = clock()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return steps * self.args.batch / (clock() - start)


def profile(runner: Runner, label: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        runner.images_per_s(runner.args.steps)
    sort = "self_cuda_time_total" if runner.device == "cuda" else "self_cpu_time_total"
    print(f"\n### profile: {label}, {runner.args.steps} steps\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, help="conf/model names (references exist for the defaults)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation (median)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile happens here)")
    parser.add_argument("--modes", nargs="+", default=["eager", "channels_last"], choices=MODES)
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--impls", nargs="+", default=["foreach"], choices=["single", "foreach", "fused"],
                        help="optimizer implementations (torch's foreach/fused flags); several: compared "
                             "interleaved on our model alone")
    parser.add_argument("--reference", default="timm", choices=["timm", "torchvision", "none"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for cuda, off for cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "process"],
                        help="process: time by this process's CPU seconds (CPU only; use with --threads 1 on a "
                             "machine shared with other jobs)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="CPU: before each timed repeat wait up to this many seconds for other processes "
                             "to leave the cores idle (0: never wait)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of each pair")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()
    args.bf16 = args.device == "cuda" if args.bf16 is None else args.bf16
    if args.device == "cuda" and args.clock != "wall":
        parser.error("--clock process measures CPU time; on CUDA only wall time means anything")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)

    where = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    print(f"# {where}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"Python {platform.python_version()}, {datetime.date.today()}")
    print(f"# batch {args.batch}, {args.optimizer} ({', '.join(args.impls)}), {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"median of {args.repeats} interleaved repeats of {args.steps} steps after {args.warmup} warm-up, "
          f"{args.clock} clock")
    peaks = [gemm_peak(args.device, clock=CLOCKS[args.clock])]
    print(f"# matrix-product peak: {peaks[0] / 1e9:,.0f} GFLOP/s", flush=True)

    results = []
    for size in args.sizes:
        for name in args.models:
            ours = build_ours(name)
            reference = None
            if args.reference != "none" and len(args.impls) == 1 and name in MODELS:
                reference = build_reference(name, args.reference)
            pairs = [("ours", ours)] + ([(reference[1], reference[0])] if reference else [])
            flops = {label: forward_flops(model, size) for label, model in pairs}
            params = {label: sum(p.numel() for p in model.parameters()) for label, model in pairs}
            print(f"# {name} at {size} px: " + ", ".join(
                f"{label} {params[label]:,} parameters, {flops[label] / 1e9:.2f} GFLOP forward/image" for label, _ in pairs))
            for mode in args.modes:
                runners = [((label, impl), Runner(copy.deepcopy(model), mode, args, size, impl))
                           for impl in args.impls for label, model in pairs]
                for _, runner in runners:
                    for _ in range(args.warmup):
                        runner.step()
                    sync(args.device)
                speeds = {key: [] for key, _ in runners}
                for _ in range(args.repeats):
                    for key, runner in runners:  # interleaved: load changes hit each alike
                        if args.device == "cpu" and args.quiet_wait:
                            busy = wait_for_quiet(args.quiet_wait)
                            if busy > 0.2:
                                print(f"# (timed with the CPU {busy:.0%} busy with other work)", flush=True)
                        speeds[key].append(runner.images_per_s(args.steps))
                if args.profile:
                    for (label, impl), runner in runners:
                        profile(runner, f"{name} {size} px {mode}, {label}, {impl}", args.profile_rows)
                for impl in args.impls:
                    ours_all = speeds[("ours", impl)]
                    row = {"model": name, "size": size, "mode": mode if len(args.impls) == 1 else f"{mode}, {impl}",
                           "ours": statistics.median(ours_all), "ours_best": max(ours_all), "ours_flops": flops["ours"]}
                    line = f"{name} {size}px {row['mode']}: ours {fmt(row['ours'], 1)} img/s {[round(v, 1) for v in ours_all]}"
                    if reference:
                        ref_all = speeds[(reference[1], impl)]
                        row.update(ref=reference[1], ref_ips=statistics.median(ref_all), ref_best=max(ref_all),
                                   ref_flops=flops[reference[1]])
                        line += (f", {reference[1]} {fmt(row['ref_ips'], 1)} {[round(v, 1) for v in ref_all]}, "
                                 f"ratio {row['ours'] / row['ref_ips']:.2f}")
                    results.append(row)
                    print(line, flush=True)
                del runners
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            del ours, reference, pairs
            gc.collect()
            peaks.append(gemm_peak(args.device, repeats=2, clock=CLOCKS[args.clock]))  # between models: the peak under today's load
    peak = max(peaks)
    print(f"# matrix-product peaks measured: {', '.join(f'{p / 1e9:,.0f}' for p in peaks)} GFLOP/s; "
          f"the highest is the peak\n")

    print("| model | px | mode | ours img/s | reference | reference img/s | ours/ref | ours/ref, best repeats "
          "| ours GFLOP/s | of peak | ref of peak |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        achieved = 3 * r["ours_flops"] * r["ours"]
        cells = [r["model"], str(r["size"]), r["mode"], fmt(r["ours"], 1)]
        if "ref" in r:
            ref_achieved = 3 * r["ref_flops"] * r["ref_ips"]
            cells += [r["ref"], fmt(r["ref_ips"], 1), f"{r['ours'] / r['ref_ips']:.2f}x",
                      f"{r['ours_best'] / r['ref_best']:.2f}x"]
        else:
            cells += ["-", "-", "-", "-"]
        cells += [fmt(achieved / 1e9), f"{achieved / peak:.0%}"]
        cells += [f"{ref_achieved / peak:.0%}" if "ref" in r else "-"]
        print("| " + " | ".join(cells) + " |")
    print("\nimg/s: median of the repeats; 'best repeats': the ratio of each side's fastest repeat (the least "
          "disturbed by other processes).")
    print(f"Peak: {peak / 1e9:,.0f} GFLOP/s ({'bf16 8192^2' if args.device == 'cuda' else 'fp32 2048^2'} matrix "
          f"product); training FLOPs = 3 x forward FLOPs (FlopCounterMode) per image.")


if __name__ == "__main__":
    main()
