"""Benchmark 6 of issue 9: GPU training and sampling throughput, and model FLOPs utilisation (MFU).

For 2D at 128^2 and 3D at 64^3, with the ``gpu`` preset's denoiser (channels [64, 128, 256, 256],
2 layers per block, attention), each variant is timed after warm-up with CUDA synchronised:

* ``bf16``: bf16 autocast (what ``GeneratorFit.step`` and ``ShardSampler`` do on CUDA), contiguous;
* ``bf16_cl``: plus channels_last (2D) / channels_last_3d (3D) for model and inputs;
* ``bf16_cl_compile``: plus ``torch.compile`` (its compile time is reported apart).

Training: images/s of ``GeneratorFit.step`` (forward, backward, clipping, AdamW, EMA). Sampling:
samples/s of ``process.sample`` (the gpu preset's sampler and per-sample generators, as the sample stage).
FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one training step and on one whole
sampling call (eager); MFU = achieved FLOP/s / the card's dense bf16 peak (table below, by
``torch.cuda.get_device_name()``; ``--peak-tflops`` overrides). The JSON is rewritten after every
measurement, so a run cut short keeps what it measured; ``--budget-s`` skips what would not fit.

    bash bench/gpu.sh                                       # on a GPU machine (calls this file)
    .venv/bin/python bench/gpu_check.py --cpu --quick       # tiny sizes on CPU: checks the code path
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from raysynth.config import load_config
from raysynth.diffusion.trainer import GeneratorFit

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 SXM": 989.4, "H200 NVL": 835.0}
CASES = {  # dims -> (side, train batch, sample batch, sampling steps, timed train steps)
    "gpu": {2: (128, 64, 256, 20, 20), 3: (64, 4, 8, 20, 10)},
    "cpu": {2: (16, 4, 4, 2, 2), 3: (8, 2, 2, 2, 2)},
}


def card_peak(name: str) -> tuple[str | None, float | None]:
    for gpu in ("H200", "H100"):
        if gpu in name:
            kind = "NVL" if "NVL" in name else "PCIe" if "PCIe" in name else "SXM"
            return f"{gpu} {kind}", PEAK_BF16_TFLOPS[f"{gpu} {kind}"]
    return None, None


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(dims: int, side: int, batch: int, device, quick_cpu: bool):
    over = [f"data.dims={dims}", f"data.image_size={side}", f"diffusion.batch_size={batch}"]
    if quick_cpu:
        over += ["diffusion.channels=[8,16]", "diffusion.layers_per_block=1"]
    cfg = load_config("gpu", overrides=over)
    torch.manual_seed(0)
    fit = GeneratorFit(cfg.diffusion, dims=dims, in_channels=1, image_size=side, num_classes=2, device=device)
    return cfg, fit


def memory_format(dims: int, channels_last: bool):
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def train_case(dims, side, batch, steps, device, variant, quick_cpu) -> dict:
    cfg, fit = build(dims, side, batch, device, quick_cpu)
    fmt = memory_format(dims, "_cl" in variant)
    fit.model.to(memory_format=fmt)
    x = torch.rand(batch, 1, *(side,) * dims, device=device).mul(2).sub(1).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:  # one eager step: forward + backward
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = fit.process.training_loss(fit.model, x, y)
        loss.backward()
    fit.optimizer.zero_grad(set_to_none=True)
    compile_s = None
    if "compile" in variant:
        torch._dynamo.reset()  # one Denoiser.forward serves 2D and 3D: no shape-driven recompiles
        fit.trained = torch.compile(fit.model, dynamic=False)
        t0 = time.perf_counter()
        fit.step(x, y)
        sync(device)
        compile_s = time.perf_counter() - t0
    for _ in range(3):  # warm-up (cuDNN autotuning, allocator)
        fit.step(x, y)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fit.step(x, y)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    return {"images_per_s": batch / seconds, "seconds_per_step": seconds, "flops_per_step": counter.get_total_flops(),
            "achieved_tflops": counter.get_total_flops() / seconds / 1e12, "compile_s": compile_s}


def sample_case(dims, side, batch, steps, device, variant, quick_cpu) -> dict:
    cfg, fit = build(dims, side, batch, device, quick_cpu)
    model = fit.model.eval().to(memory_format=memory_format(dims, "_cl" in variant))
    labels, shape = torch.arange(batch, device=device) % 2, (1,) + (side,) * dims
    sampler = cfg.sampling.sampler

    def run(m, n_steps):
        gens = [torch.Generator(device=device).manual_seed(j) for j in range(batch)]
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return fit.process.sample(m, labels, shape, sampler, n_steps, gens)

    with FlopCounterMode(display=False) as counter:
        run(model, steps)
    compile_s = None
    if "compile" in variant:
        torch._dynamo.reset()
        model = torch.compile(model, dynamic=False)
        t0 = time.perf_counter()
        run(model, steps)
        sync(device)
        compile_s = time.perf_counter() - t0
    run(model, 2)
    sync(device)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        run(model, steps)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    return {"samples_per_s": batch / seconds, "seconds_per_batch": seconds, "sampler": sampler, "steps": steps,
            "flops_per_batch": counter.get_total_flops(), "achieved_tflops": counter.get_total_flops() / seconds / 1e12,
            "compile_s": compile_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU (with --quick: tiny sizes, to check the code)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help="auto: on GPU only")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    p.add_argument("--budget-s", type=float, default=480.0, help="skip measurements that would start after this")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if not in the table")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:  # 2 OpenMP threads on a busy 2-core box can be 10-100x slower than 1 (spin-waiting)
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    card, peak = card_peak(name) if device.type == "cuda" else (None, None)
    peak = args.peak_tflops or peak
    quick_cpu = device.type == "cpu" and args.quick
    cases = CASES["cpu" if quick_cpu else "gpu"]
    compile_on = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    variants = ["bf16", "bf16_cl"] + (["bf16_cl_compile"] if compile_on else [])
    report = {"device": name, "card": card, "peak_bf16_tflops": peak, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "quick_cpu": quick_cpu, "results": [], "skipped": []}
    print(f"device: {name} ({card or 'no peak in table'}; peak bf16 {peak} TFLOP/s)", flush=True)
    for variant in variants:  # eager variants of every dims first: compile last, as it may not fit
        for dims in args.dims:
            side, tb, sb, s_steps, t_steps = cases[dims]
            for what, fn, batch, steps in (("train", train_case, tb, t_steps), ("sample", sample_case, sb, s_steps)):
                key = f"{dims}d {what} {variant}"
                if time.perf_counter() - t_start > args.budget_s:
                    report["skipped"].append(key)
                    print(f"{key}: skipped (budget)", flush=True)
                    continue
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    row = fn(dims, side, batch, steps, device, variant, quick_cpu)
                except Exception as exc:  # record and go on: one failing variant must not lose the rest
                    row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                row.update({"dims": dims, "what": what, "variant": variant, "side": side, "batch": batch})
                if peak and "achieved_tflops" in row:
                    row["mfu"] = row["achieved_tflops"] / peak
                if device.type == "cuda":
                    row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                report["results"].append(row)
                speed = row.get("images_per_s") or row.get("samples_per_s")
                print(f"{key}: " + (row["error"] if "error" in row else
                      f"{speed:9.1f} {'images' if what == 'train' else 'samples'}/s, {row['achieved_tflops']:.3f} TFLOP/s"
                      + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "")
                      + (f", compile {row['compile_s']:.0f}s" if row.get("compile_s") else "")), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(report, indent=2))
    report["seconds"] = time.perf_counter() - t_start
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
