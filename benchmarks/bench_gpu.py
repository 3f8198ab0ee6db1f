"""Speed (and peak memory) of the computations whose device-dependent choices were never measured on a GPU.

One process, one device (``--device``), every item in fp32 and, where the library allows it, in bf16. Each
item calls the library's own functions (the distillation loop's ``run_iteration``, ``train_from_scratch``,
``train_proxy_pool``, ...) the way ``bench_distill.py``, ``bench_trajectory.py`` and ``bench_evaluate.py`` do:

- ``dm_iteration[ipc=10]``, ``dm_iteration[ipc=50]``: one DM iteration (ConvNet-3, DSA, 256 real images per class);
- ``dm_forward_images``: the same at IPC 10 with real images embedded one class per pass (the CPU's 'auto') or in
  passes of up to 4096 (CUDA's 'auto', ``FORWARD_IMAGES_BY_DEVICE`` in methods/dm.py);
- ``dm_cmi_iteration[ResNet18]``: DM plus the CMI term, one random ResNet18 proxy per step (the paper's rule);
- ``cmi_proxies_vmap[k=4]``: the CMI term with 4 ResNet18 proxies per step, one vmap pass or a loop
  (``vectorise_proxies``' 'auto': vmap on CUDA only), its value and its gradient;
- ``dsa_outer_step``: a DSA iteration of 2 outer steps (50 network epochs between them, the IPC-10 recipe);
- ``mtt_iteration[syn_steps=20]``, ``mtt_iteration[syn_steps=50]``: one MTT iteration at IPC 10 (experts trained
  here for 3 epochs on 100 images per class: an iteration's cost does not depend on how good they are);
- ``evaluation[5x1000]``: 5 runs x 1000 epochs of the protocol on an IPC-10 set, sequential or vectorised
  ('batched': vmap, CUDA's 'auto'); bf16 only sequential (vmap cannot autocast);
- ``proxy_training[ResNet18]``: ``train_proxy_pool`` throughput in images per second (each proxy's test pass
  and file write included), sequential or vectorised.

Times: CUDA events around each call after warm-up calls (cuDNN's algorithm choice, the allocator and lazy
initialisation stay out of the numbers), the median of ``--repeats``; on a CPU ``time.perf_counter``. Peak
memory: ``torch.cuda.max_memory_allocated`` per variant on CUDA, beside the baseline allocated before it. Proxy
and network weights are random: the cost does not depend on them. Data: Fashion-MNIST where it loads, else
random tensors of its shape (``--data``).

``--budget-seconds`` bounds the whole run: an item is skipped (and listed under ``skipped``) once the budget is
spent, and the evaluation trains fewer epochs (recorded, with the projected time of all 1000) when the
projection from its warm-up would overrun. ``--tiny`` shrinks everything (IPC 2, 12 real images per class,
one- or two-layer networks, 2 epochs, 2 timed calls) so the whole script runs on a CPU in seconds: it proves
the script, not a speed. Prints one JSON object (docs/gpu.md says what each figure settles).

    python benchmarks/bench_gpu.py --device cuda --out gpu.json
    python benchmarks/bench_gpu.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infodistill import __version__
from infodistill.data import ClassSampler, RealData, dataset_info, load_dataset
from infodistill.errors import UserInputError
from infodistill.evaluate import random_subset
from infodistill.experts import train_experts
from infodistill.loop import DistillConfig, RegularizerTerm, build_run_parts, make_context, run_iteration
from infodistill.methods import DistributionMatching
from infodistill.models import build_model
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.regularizers import CMIRegularizer
from infodistill.seeds import run_seeds
from infodistill.synthetic import PixelSet
from infodistill.training import EvalConfig, train_from_scratch
from report import emit_json  # benchmarks/report.py (scripts run from this folder)

ITEMS = (
    "dm_iteration[ipc=10]",
    "dm_iteration[ipc=50]",
    "dm_forward_images",
    "dm_cmi_iteration[ResNet18]",
    "cmi_proxies_vmap[k=4]",
    "dsa_outer_step",
    "mtt_iteration[syn_steps=20]",
    "mtt_iteration[syn_steps=50]",
    "evaluation[5x1000]",
    "proxy_training[ResNet18]",
)
"""Every item, in the order they run (cheapest and most decisive first). The names give the full-size
setting; under ``--tiny`` each item's ``setting`` records the small one actually used."""
PRECISIONS = ("fp32", "bf16")
TRAINING_VARIANTS = {"fp32/sequential": ("fp32", "off"), "fp32/batched": ("fp32", "on"),
                     "bf16/sequential": ("bf16", "off")}
"""Variants of the training items: (precision, batched). No bf16 vectorised: vmap cannot autocast (evaluate.py)."""
MTT_ITEMS = ("mtt_iteration[syn_steps=20]", "mtt_iteration[syn_steps=50]")
MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    """Every size the items use; :data:`FULL` for the real run, :data:`TINY` for a CPU check of the script."""

    model: str
    proxy_arch: str
    ipcs: tuple[int, int]
    batch_real: int
    real_per_class: int
    test_per_class: int
    proxies: int
    vmap_proxies: int
    dsa_inner_loop: int
    mtt_syn_steps: tuple[int, int]
    expert_per_class: int
    eval_model: str
    eval_runs: int
    eval_epochs: int
    eval_probe_epochs: int
    proxy_per_class: int
    proxy_epochs: int
    warmup: int
    repeats: int


FULL = Sizes(model="ConvNet-3", proxy_arch="ResNet18", ipcs=(10, 50), batch_real=256, real_per_class=500,
             test_per_class=100, proxies=2, vmap_proxies=4, dsa_inner_loop=50, mtt_syn_steps=(20, 50),
             expert_per_class=100, eval_model="ConvNet-3", eval_runs=5, eval_epochs=1000, eval_probe_epochs=20,
             proxy_per_class=500, proxy_epochs=2, warmup=2, repeats=5)
TINY = Sizes(model="ConvNet-1-8", proxy_arch="ConvNetGAP-1-8", ipcs=(2, 3), batch_real=4, real_per_class=12,
             test_per_class=4, proxies=2, vmap_proxies=2, dsa_inner_loop=1, mtt_syn_steps=(2, 3),
             expert_per_class=12, eval_model="ConvNet-1-8", eval_runs=2, eval_epochs=2, eval_probe_epochs=1,
             proxy_per_class=12, proxy_epochs=1, warmup=1, repeats=2)


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(f"[bench_gpu] {message}", file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception, for the report."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ----------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_smi_fields() -> dict[str, str | None]:
    """Driver version and GPU name as ``nvidia-smi`` reports them (None where it is missing or fails)."""
    fields: dict[str, str | None] = {"driver_version": None, "nvidia_smi_name": None}
    if shutil.which("nvidia-smi") is None:
        return fields
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return fields
    first = output.strip().splitlines()[0] if output.strip() else ""
    if "," in first:
        fields["driver_version"], fields["nvidia_smi_name"] = (part.strip() for part in first.split(",", 1))
    return fields


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: device, driver, CUDA and cuDNN, torch, CPU, TF32 settings."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        **nvidia_smi_fields(),
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32": {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "torch": torch.__version__,
        "infodistill": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class Bench:
    """Times the variants of the items on one device within a budget, and collects the report."""

    def __init__(self, device: torch.device, sizes: Sizes, budget_seconds: float, skip: set[str]) -> None:
        self.device = device
        self.sizes = sizes
        self.budget_seconds = budget_seconds
        self.skip = skip
        self.started = time.perf_counter()
        self.items: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.baseline_mib: float | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        """Seconds of the budget left."""
        return self.budget_seconds - (time.perf_counter() - self.started)

    def synchronise(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds_of(self, call: Callable[[], None]) -> float:
        """Seconds of one call: CUDA events around it on CUDA (the host clock would time the launches only)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    def reset_memory(self) -> None:
        """Start a variant's peak-memory count; what is already allocated (the real data on the device, pools,
        experts) is its baseline, reported beside the peak."""
        self.baseline_mib = None
        if self.cuda:
            self.synchronise()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = round(torch.cuda.memory_allocated(self.device) / MIB, 1)

    def memory(self) -> dict[str, float | None]:
        """Peak memory allocated on CUDA since :meth:`reset_memory`, and the baseline it started from (MiB)."""
        peak = round(torch.cuda.max_memory_allocated(self.device) / MIB, 1) if self.cuda else None
        return {"peak_memory_mib": peak, "baseline_memory_mib": self.baseline_mib}

    def repeated(self, step: Callable[[int], None], warmup: int | None = None,
                 repeats: int | None = None) -> dict[str, Any]:
        """Median seconds per call of ``step(index)`` (indices 0, 1, ... across warm-up and timed calls)."""
        warmup = self.sizes.warmup if warmup is None else warmup
        repeats = self.sizes.repeats if repeats is None else repeats
        self.reset_memory()
        for index in range(warmup):
            step(index)
        self.synchronise()
        times = [self.seconds_of(lambda index=index: step(warmup + index)) for index in range(repeats)]
        return {"seconds": round(sorted(times)[len(times) // 2], 6), "times": [round(value, 6) for value in times],
                **self.memory()}

    def item(self, name: str, setting: dict[str, Any], variants: dict[str, Callable[[], dict[str, Any]]]) -> None:
        """Run every variant of item ``name`` (each returns its figures) unless skipped or out of budget;
        a variant that fails is recorded with its error and the others still run."""
        if name in self.skip:
            self.skipped[name] = "--skip"
            return
        if self.remaining() <= 0:
            self.skipped[name] = f"budget of {self.budget_seconds:g} s spent"
            log(f"{name}: skipped, budget spent")
            return
        entry: dict[str, Any] = {"setting": setting, "variants": {}}
        self.items[name] = entry
        for variant, run in variants.items():
            if self.remaining() <= 0:
                entry["variants"][variant] = {"skipped": f"budget of {self.budget_seconds:g} s spent"}
                continue
            try:
                figures = run()
            except Exception as error:  # noqa: BLE001 - one failing variant must not lose the others' figures
                figures = {"error": first_line(error)}
                log(f"{name} {variant}: FAILED {figures['error']}")
                if self.cuda:
                    torch.cuda.empty_cache()  # after an out-of-memory error, give the next variant the memory
            else:
                log(f"{name} {variant}: {figures['seconds']:.4f} s"
                    + (f", peak {figures['peak_memory_mib']} MiB" if figures.get("peak_memory_mib") else ""))
            entry["variants"][variant] = figures


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def random_fashion_mnist(per_class: int, test_per_class: int, seed: int) -> RealData:
    """Random uint8 images with Fashion-MNIST's shape, statistics and classes (timing needs no real pixels)."""
    info = dataset_info("fashion-mnist")
    generator = torch.Generator().manual_seed(seed)

    def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(info.num_classes).repeat_interleave(count)
        images = torch.randint(0, 256, (len(labels), info.channels, *info.image_size), generator=generator,
                               dtype=torch.uint8)
        return images, labels

    train_images, train_labels = split(per_class)
    test_images, test_labels = split(test_per_class)
    return RealData(info, train_images, train_labels, test_images, test_labels)


def load_data(choice: str, sizes: Sizes, seed: int) -> tuple[RealData, str]:
    """Fashion-MNIST (``fashion-mnist``; ``auto`` falls back to random data where it is not installed) or
    random tensors of its shape (``random``)."""
    if choice in ("auto", "fashion-mnist"):
        try:
            return load_dataset("fashion-mnist"), "fashion-mnist"
        except UserInputError as error:
            if choice == "fashion-mnist":
                raise
            log(f"Fashion-MNIST not found ({str(error).splitlines()[0][:120]}...); random tensors of its shape")
    random = random_fashion_mnist(sizes.real_per_class, sizes.test_per_class, seed)
    return random, "random tensors shaped like fashion-mnist"


# ----------------------------------------------------------------------------------------------
# The items
# ----------------------------------------------------------------------------------------------


class Items:
    """Builds each item's variants from the library's functions; ``bench.item`` runs them."""

    def __init__(self, bench: Bench, real: RealData, work: Path, seed: int) -> None:
        self.bench, self.real, self.work, self.seed = bench, real, work, seed
        self.sizes = bench.sizes
        self.device = bench.device
        images, labels = real.train_tensors()
        self.sampler = ClassSampler(images.to(self.device), labels.to(self.device), real.info.num_classes)
        self.batch_real = min(self.sizes.batch_real, self.sampler.smallest_class_size())

    def pool(self, count: int) -> ProxyPool:
        """``count`` proxies of the proxy architecture with random weights, on the device."""
        info, arch = self.real.info, self.sizes.proxy_arch
        models = [build_model(arch, info.channels, info.num_classes, info.image_size, seed=k).to(self.device)
                  for k in range(count)]
        return ProxyPool(models, arch, info)

    def loop_step(self, config: DistillConfig, precision: str, terms: list[RegularizerTerm] | None = None,
                  method: Any = None) -> Callable[[int], None]:
        """One iteration of ``config`` through the shared loop, as ``distill`` runs it (iteration ``index + 1``)."""
        config = config.with_method_defaults()
        parts = build_run_parts(config, self.real, self.sampler, self.device)
        chosen = parts.method if method is None else method
        terms = terms or []

        def step(index: int) -> None:
            context = make_context(config, index + 1, parts.synthetic, self.sampler, self.real, parts.augment,
                                   self.device)
            run_iteration(chosen, terms, context, parts.optimizer, parts.average, precision=precision)
        return step

    def dm_config(self, ipc: int) -> DistillConfig:
        return DistillConfig(method="dm", ipc=ipc, batch_real=self.batch_real, model=self.sizes.model,
                             device=str(self.device), seed=self.seed)

    def dm(self, name: str, ipc: int) -> None:
        setting = {"ipc": ipc, "batch_real": self.batch_real, "model": self.sizes.model, "augment": "dsa"}
        self.bench.item(name, setting, {
            precision: (lambda precision=precision: self.bench.repeated(self.loop_step(self.dm_config(ipc), precision)))
            for precision in PRECISIONS})

    def dm_forward_images(self) -> None:
        ipc = self.sizes.ipcs[0]
        limits = {"fp32/one_class_per_pass": self.batch_real, "fp32/max_forward_images=4096": 4096}
        setting = {"ipc": ipc, "batch_real": self.batch_real, "model": self.sizes.model,
                   "real_images_per_iteration": self.batch_real * self.real.info.num_classes}
        self.bench.item("dm_forward_images", setting, {
            variant: (lambda limit=limit: self.bench.repeated(self.loop_step(
                self.dm_config(ipc), "fp32",
                method=DistributionMatching(batch_real=self.batch_real, max_forward_images=limit))))
            for variant, limit in limits.items()})

    def dm_cmi(self) -> None:
        ipc = self.sizes.ipcs[0]
        pool = self.pool(self.sizes.proxies)
        terms = [RegularizerTerm("cmi", CMIRegularizer(pool), 1000.0, 1)]  # the weight does not change the cost
        setting = {"ipc": ipc, "batch_real": self.batch_real, "model": self.sizes.model,
                   "proxy": self.sizes.proxy_arch, "pool": len(pool), "proxies_per_step": 1}
        self.bench.item("dm_cmi_iteration[ResNet18]", setting, {
            precision: (lambda precision=precision: self.bench.repeated(
                self.loop_step(self.dm_config(ipc), precision, terms)))
            for precision in PRECISIONS})

    def cmi_proxies(self) -> None:
        ipc, count = self.sizes.ipcs[0], self.sizes.vmap_proxies
        pool = self.pool(count)
        synthetic = PixelSet.initialise(self.sampler, ipc, "real", torch.Generator().manual_seed(self.seed))
        images, labels = synthetic.images().detach().to(self.device), synthetic.labels.to(self.device)

        def run(batched: str) -> dict[str, Any]:
            regularizer = CMIRegularizer(pool, proxies_per_step=count, batched=batched)

            def step(index: int) -> None:
                leaf = images.clone().requires_grad_(True)
                regularizer.loss(leaf, labels, torch.Generator().manual_seed(index)).backward()
            return self.bench.repeated(step)

        setting = {"ipc": ipc, "images": len(images), "proxy": self.sizes.proxy_arch, "proxies_per_step": count,
                   "what": "CMI value and its gradient w.r.t. the images"}
        self.bench.item("cmi_proxies_vmap[k=4]", setting,
                        {"fp32/vmap": lambda: run("on"), "fp32/loop": lambda: run("off")})

    def dsa_outer_step(self) -> None:
        ipc, outer = self.sizes.ipcs[0], 2
        config = DistillConfig(method="dsa", ipc=ipc, batch_real=self.batch_real, model=self.sizes.model,
                               outer_loop=outer, inner_loop=self.sizes.dsa_inner_loop, device=str(self.device),
                               seed=self.seed)

        def run(precision: str) -> dict[str, Any]:
            figures = self.bench.repeated(self.loop_step(config, precision))
            return {**figures, "seconds_per_outer_step": figures["seconds"] / outer}

        setting = {"ipc": ipc, "batch_real": self.batch_real, "model": self.sizes.model, "outer_loop": outer,
                   "inner_loop": self.sizes.dsa_inner_loop, "seconds": "per iteration of outer_loop outer steps"}
        self.bench.item("dsa_outer_step", setting,
                        {precision: (lambda precision=precision: run(precision)) for precision in PRECISIONS})

    def experts(self) -> tuple[str, float]:
        """Experts for MTT, trained here (3 epochs, MTT's recipe); their directory and build seconds."""
        directory = self.work / "experts"
        started = time.perf_counter()
        train_experts(self.real.training_subset(self.sizes.expert_per_class, self.seed), directory,
                      model=self.sizes.model, count=2, epochs=3, device=str(self.device), seed=self.seed,
                      progress=False)
        return str(directory), time.perf_counter() - started

    def mtt(self, experts: str, build_seconds: float) -> None:
        ipc = self.sizes.ipcs[0]
        for steps, name in zip(self.sizes.mtt_syn_steps, MTT_ITEMS, strict=True):
            # lr_images and lr_lr as in bench_trajectory.py (quick experts diverge at MTT's 1000); the time of an
            # iteration does not depend on them
            config = DistillConfig(method="mtt", ipc=ipc, model=self.sizes.model, experts=experts, syn_steps=steps,
                                   expert_epochs=2, max_start_epoch=2, lr_images=100.0, lr_lr=1e-7,
                                   device=str(self.device), seed=self.seed)
            setting = {"ipc": ipc, "syn_steps": steps, "model": self.sizes.model, "memory": "full",
                       "batch_syn": "all", "experts_build_seconds": round(build_seconds, 2)}
            self.bench.item(name, setting, {
                precision: (lambda precision=precision, config=config: self.bench.repeated(
                    self.loop_step(config, precision)))
                for precision in PRECISIONS})

    def evaluation(self) -> None:
        sizes = self.sizes
        subset = random_subset(self.real, sizes.ipcs[0], self.seed)
        seeds = run_seeds(self.seed, sizes.eval_runs)
        variants = TRAINING_VARIANTS

        def train(precision: str, batched: str, epochs: int) -> bool:
            config = EvalConfig(model=sizes.eval_model, runs=sizes.eval_runs, epochs=epochs, device=str(self.device),
                                batched=batched, precision=precision, seed=self.seed)
            return train_from_scratch(subset.images, subset.labels, self.real.info.num_classes, config, seeds,
                                      progress=False)[1]

        def run(precision: str, batched: str, left: int) -> dict[str, Any]:
            self.bench.reset_memory()
            together: list[bool] = []
            # the warm-up (first calls, cuDNN's choices) is also the probe that projects the full time
            probe = self.bench.seconds_of(lambda: together.append(train(precision, batched, sizes.eval_probe_epochs)))
            projected = probe * sizes.eval_epochs / sizes.eval_probe_epochs
            share = max(self.bench.remaining(), 0.0) / left  # what this variant may spend of the budget
            epochs = sizes.eval_epochs if projected <= share else int(sizes.eval_epochs * share / projected)
            if epochs <= sizes.eval_probe_epochs:  # no time for more than the warm-up: report it, first calls and all
                epochs, seconds, from_warmup = sizes.eval_probe_epochs, probe, True
            else:
                seconds, from_warmup = self.bench.seconds_of(lambda: train(precision, batched, epochs)), False
            return {"seconds": seconds, "epochs": epochs, "trained_together": together[0], "from_warmup": from_warmup,
                    "projected_seconds_at_full_epochs": round(seconds * sizes.eval_epochs / epochs, 3),
                    **self.bench.memory()}

        setting = {"ipc": sizes.ipcs[0], "train_images": len(subset.images), "runs": sizes.eval_runs,
                   "epochs": sizes.eval_epochs, "model": sizes.eval_model, "augment": "dsa", "batch_size": 256,
                   "seconds": "one call of train_from_scratch training every run"}
        self.bench.item("evaluation[5x1000]", setting, {
            # left: this variant, those after it, and one share kept for proxy_training, the last item
            variant: (lambda precision=precision, batched=batched, left=len(variants) - position + 1:  # noqa: B008  binds this variant's values now
                      run(precision, batched, left))
            for position, (variant, (precision, batched)) in enumerate(variants.items())})

    def proxy_training(self) -> None:
        sizes, count = self.sizes, self.sizes.proxies
        variants = TRAINING_VARIANTS
        calls = iter(range(10**6))

        def build(precision: str, batched: str, epochs: int, per_class: int) -> None:
            train_proxy_pool(self.real, self.work / f"pool-{next(calls)}", arch=sizes.proxy_arch, count=count,
                             epochs=epochs, seed=self.seed, device=str(self.device), progress=False,
                             train_per_class=per_class, precision=precision, batched=batched)

        def run(precision: str, batched: str) -> dict[str, Any]:
            self.bench.reset_memory()
            build(precision, batched, 1, max(1, sizes.proxy_per_class // 10))  # warm-up: same shapes, less data
            self.bench.synchronise()
            seconds = self.bench.seconds_of(
                lambda: build(precision, batched, sizes.proxy_epochs, sizes.proxy_per_class))
            images = count * sizes.proxy_epochs * sizes.proxy_per_class * self.real.info.num_classes
            return {"seconds": seconds, "images_per_second": round(images / seconds, 1),
                    **self.bench.memory()}

        setting = {"arch": sizes.proxy_arch, "proxies": count, "epochs": sizes.proxy_epochs,
                   "train_per_class": sizes.proxy_per_class, "test_images": len(self.real.test_labels),
                   "recipe": "train_proxy_pool's (SGD lr 0.01, momentum 0.9, wd 1e-3, batch 256, no augmentation)",
                   "seconds": "one train_proxy_pool call, each proxy's test pass and file write included"}
        self.bench.item("proxy_training[ResNet18]", setting, {
            variant: (lambda precision=precision, batched=batched: run(precision, batched))
            for variant, (precision, batched) in variants.items()})


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

Measured = tuple[str, str]
"""(item, variant)."""
COMPARISONS: dict[str, dict[str, tuple[Measured, Measured]]] = {
    "bf16_over_fp32": {
        **{item: ((item, "bf16"), (item, "fp32")) for item in ITEMS if item.startswith(("dm_i", "dm_c", "dsa", "mtt"))},
        **{item: ((item, "bf16/sequential"), (item, "fp32/sequential"))
           for item in ("evaluation[5x1000]", "proxy_training[ResNet18]")},
    },
    "batched_over_sequential": {item: ((item, "fp32/batched"), (item, "fp32/sequential"))
                                for item in ("evaluation[5x1000]", "proxy_training[ResNet18]")},
    "vmap_over_loop": {"cmi_proxies_vmap[k=4]": (("cmi_proxies_vmap[k=4]", "fp32/vmap"),
                                                 ("cmi_proxies_vmap[k=4]", "fp32/loop"))},
    "forward_4096_over_one_class": {"dm_forward_images": (("dm_forward_images", "fp32/max_forward_images=4096"),
                                                          ("dm_forward_images", "fp32/one_class_per_pass"))},
    "dm_cmi_over_dm": {precision: (("dm_cmi_iteration[ResNet18]", precision), ("dm_iteration[ipc=10]", precision))
                       for precision in PRECISIONS},
}
"""Time ratios, first over second (below 1: the first is faster), that settle the 'auto' choices of docs/gpu.md."""


def seconds_for(items: dict[str, dict[str, Any]], item: str, variant: str) -> float | None:
    """Seconds of one variant, scaled to the full epochs where the evaluation trained fewer."""
    figures = items.get(item, {}).get("variants", {}).get(variant, {})
    if "projected_seconds_at_full_epochs" in figures:
        return figures["projected_seconds_at_full_epochs"]
    return figures.get("seconds")


def ratios(items: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The ratios of :data:`COMPARISONS` that both variants were measured for."""
    result: dict[str, dict[str, float]] = {}
    for name, pairs in COMPARISONS.items():
        for key, (first, second) in pairs.items():
            top, bottom = seconds_for(items, *first), seconds_for(items, *second)
            if top is not None and bottom:
                result.setdefault(name, {})[key] = round(top / bottom, 3)
    return result


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: proves the script on a CPU in seconds")
    parser.add_argument("--budget-seconds", type=float, default=300.0,
                        help="stop starting items after this many seconds (default 300)")
    parser.add_argument("--repeats", type=int, help="timed calls per variant (default 5; 2 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 2; 1 with --tiny)")
    parser.add_argument("--data", choices=("auto", "fashion-mnist", "random"), default="auto",
                        help="auto: Fashion-MNIST where installed, else random tensors (--tiny: always random)")
    parser.add_argument("--skip", action="append", default=[], choices=ITEMS, metavar="ITEM",
                        help=f"leave an item out (repeatable): {', '.join(ITEMS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: --device cuda but torch sees no CUDA device")
    sizes = TINY if args.tiny else FULL
    if args.repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    if args.warmup is not None:
        sizes = dataclasses.replace(sizes, warmup=args.warmup)
    torch.manual_seed(args.seed)  # the library's draws take explicit generators; this fixes anything else
    bench = Bench(device, sizes, args.budget_seconds, set(args.skip))
    real, data = load_data("random" if args.tiny else args.data, sizes, args.seed)
    log(f"device {device}, data: {data}, tiny: {args.tiny}, budget {args.budget_seconds:g} s")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as temporary:
        items = Items(bench, real, Path(temporary), args.seed)

        def mtt() -> None:
            if all(name in args.skip for name in MTT_ITEMS) or bench.remaining() <= 0:  # no experts needed
                spent = f"budget of {args.budget_seconds:g} s spent"
                bench.skipped.update({name: "--skip" if name in args.skip else spent for name in MTT_ITEMS})
                return
            items.mtt(*items.experts())

        steps: list[tuple[tuple[str, ...], Callable[[], None]]] = [
            (ITEMS[:1], lambda: items.dm(ITEMS[0], sizes.ipcs[0])),
            (ITEMS[1:2], lambda: items.dm(ITEMS[1], sizes.ipcs[1])),
            (("dm_forward_images",), items.dm_forward_images),
            (("dm_cmi_iteration[ResNet18]",), items.dm_cmi),
            (("cmi_proxies_vmap[k=4]",), items.cmi_proxies),
            (("dsa_outer_step",), items.dsa_outer_step),
            (MTT_ITEMS, mtt),
            (("evaluation[5x1000]",), items.evaluation),
            (("proxy_training[ResNet18]",), items.proxy_training),
        ]
        for names, step in steps:
            try:
                step()
            except Exception as error:  # noqa: BLE001 - a setup that fails (pool, experts) loses its items only
                log(f"{', '.join(names)}: setup FAILED {first_line(error)}")
                for name in names:
                    if name not in bench.items:
                        bench.skipped[name] = f"setup failed: {first_line(error)}"
    report = {
        "benchmark": "gpu",
        "machine": machine(device),
        "settings": {"tiny": args.tiny, "data": data, "sizes": dataclasses.asdict(sizes),
                     "budget_seconds": args.budget_seconds, "seed": args.seed,
                     "timer": "cuda events" if device.type == "cuda" else "time.perf_counter"},
        "items": bench.items,
        "ratios": ratios(bench.items),
        "skipped": bench.skipped,
        "total_seconds": round(time.perf_counter() - bench.started, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
