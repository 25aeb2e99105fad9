"""Benchmark 6 of issues 9 and 17: GPU training and sampling throughput, peak memory and MFU.

Two paths, each timed after warm-up with CUDA synchronised, in 2D and 3D:

* pixel (issue 9): 2D 128^2 and 3D 64^3 images; the ``gpu`` preset's denoiser (channels
  [64, 128, 256, 256], 2 layers per block, attention) trained on and sampling the images
  themselves (``diffusion.space=pixel``);
* latent (issue 17, the ``gpu`` preset's ``diffusion.space=latent``): 2D 256^2 and 3D 128^3 images.
  ``ae_train``: images/s of ``AutoencoderFit.step`` (2D: the preset's autoencoder, channels
  [64, 128, 128], 2 res blocks, patch-GAN; 3D: widths [32, 64, 64] at batch 2, which fit an
  80 GB card where the preset's widths at its batch 32 do not); it is timed in both halves of a
  fit (without, then with the discriminator) and reported as the fit's average, each half apart in
  the JSON. ``train``: the same denoiser as the pixel path on the 64^2 / 32^3 x 4 latents.
  ``sample``: samples/s end to end, the preset's sampler and steps (Euler, 10) on latents, then one
  decode of the whole batch to full size (as the sample stage's ``ShardSampler``; the decode's
  share of the time is in the JSON).

Variants (``bf16`` is on wherever the product runs on CUDA, so it is the baseline):

* ``fp32`` (``ae_train`` only): no autocast, as ``AutoencoderFit.step`` runs in the autoencoder stage;
* ``bf16``: bf16 autocast (what ``GeneratorFit.step`` and ``ShardSampler`` do on CUDA), contiguous;
* ``bf16_cl``: plus channels_last (2D) / channels_last_3d (3D) for the networks and inputs;
* ``bf16_cl_compile``: plus ``torch.compile`` of every network in the case (its compile time is
  reported apart; the denoiser, the autoencoder and discriminator, or the denoiser and ``decode``).

Training: images/s of one optimiser step (``GeneratorFit.step``: forward, backward, clipping,
AdamW, EMA; ``AutoencoderFit.step``: the same for L1 + KL (+ adversarial) and, in the second
half, the discriminator's step). Sampling: samples/s of ``process.sample`` with per-sample
generators (+ decode). Peak memory: ``torch.cuda.max_memory_allocated`` after a reset, per case.
FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one eager training step and on one
whole sampling call; MFU = achieved FLOP/s / the card's dense bf16 peak (table below, by
``torch.cuda.get_device_name()``; ``--peak-tflops`` overrides), for the fp32 rows too.

Order: every eager case first (latent before pixel), ``torch.compile`` last. The JSON is rewritten
after every case, so a run cut short keeps what it measured; ``--budget-s`` skips a case that would
end after it (estimated from the case's eager run and the longest compile so far).

    bash bench/gpu.sh                                       # on a GPU machine (calls this file)
    .venv/bin/python bench/gpu_check.py --cpu --quick       # tiny sizes on CPU: checks every code path
    .venv/bin/python bench/gpu_check.py --cpu --quick --compile yes   # torch.compile too (slower)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from raysynth.config import load_config
from raysynth.diffusion.autoencoder import AutoencoderFit, build_autoencoder, decode, latent_side
from raysynth.diffusion.trainer import GeneratorFit

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 SXM": 989.4, "H200 NVL": 835.0}
CASES = {  # pixel path: dims -> (side, train batch, sample batch, sampling steps, timed train steps)
    "gpu": {2: (128, 64, 256, 20, 20), 3: (64, 4, 8, 20, 10)},
    "cpu": {2: (16, 4, 4, 2, 2), 3: (8, 2, 2, 2, 2)},
}
# Latent path: dims -> sizes; ae_channels None: the gpu preset's; sample_steps None: its sampling.steps.
# 2D samples 128 at a time, not the preset's sampling.batch_size 256: at 256 the decoder's last
# upsample output (256 x 128 x 256 x 256) has 2^31 elements, past the int32 indexing of some CUDA
# upsample kernels (channels_last nearest in particular), and one case must not sink the run.
LATENT_CASES = {
    "gpu": {
        2: {"side": 256, "ae_channels": None, "ae_batch": 32, "ae_steps": 8,
            "train_batch": 64, "train_steps": 20, "sample_batch": 128, "sample_steps": None},
        3: {"side": 128, "ae_channels": [32, 64, 64], "ae_batch": 2, "ae_steps": 6,
            "train_batch": 32, "train_steps": 10, "sample_batch": 8, "sample_steps": None},
    },
    "cpu": {
        2: {"side": 16, "ae_channels": [8, 16, 16], "ae_batch": 2, "ae_steps": 2,
            "train_batch": 4, "train_steps": 2, "sample_batch": 4, "sample_steps": 2},
        3: {"side": 16, "ae_channels": [8, 16, 16], "ae_batch": 1, "ae_steps": 2,
            "train_batch": 2, "train_steps": 2, "sample_batch": 2, "sample_steps": 2},
    },
}
LATENT_SCALE = 1.0
"""Stands in for a fold's scale factor (1 / std of its training latents): the cost is the same."""
COMPILE_GUESS_S = 60.0
"""What the budget assumes a compile takes until one has been measured."""


def card_peak(name: str) -> tuple[str | None, float | None]:
    for gpu in ("H200", "H100"):
        if gpu in name:
            kind = "NVL" if "NVL" in name else "PCIe" if "PCIe" in name else "SXM"
            return f"{gpu} {kind}", PEAK_BF16_TFLOPS[f"{gpu} {kind}"]
    return None, None


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, variant: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and "bf16" in variant)


def config(dims: int, side: int, quick_cpu: bool, space: str = "pixel", extra=()):
    over = [f"data.dims={dims}", f"data.image_size={side}", f"diffusion.space={space}", *extra]
    if quick_cpu:
        over += ["diffusion.channels=[8,16]", "diffusion.layers_per_block=1"]
    return load_config("gpu", overrides=over)


def ae_overrides(channels) -> list[str]:
    if channels is None:
        return []
    return [f"autoencoder.channels=[{','.join(map(str, channels))}]",
            f"autoencoder.downsampling_factor={2 ** (len(channels) - 1)}"]


def data_shape(cfg, dims: int, side: int, space: str) -> tuple[int, ...]:
    """``(C, *S)`` of what the denoiser sees: a grey image, or the autoencoder's latent."""
    if space == "latent":
        return (cfg.autoencoder.latent_channels,) + (latent_side(side, cfg.autoencoder),) * dims
    return (1,) + (side,) * dims


def build(dims, side, batch, device, quick_cpu, space="pixel", extra=()):
    cfg = config(dims, side, quick_cpu, space, [f"diffusion.batch_size={batch}", *extra])
    shape = data_shape(cfg, dims, side, space)
    torch.manual_seed(0)
    fit = GeneratorFit(cfg.diffusion, dims=dims, in_channels=shape[0], image_size=shape[1], num_classes=2,
                       device=device)
    return cfg, fit


def memory_format(dims: int, channels_last: bool):
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def train_case(dims, side, batch, steps, device, variant, quick_cpu, space="pixel", extra=()) -> dict:
    cfg, fit = build(dims, side, batch, device, quick_cpu, space, extra)
    fmt = memory_format(dims, "_cl" in variant)
    fit.model.to(memory_format=fmt)
    shape = data_shape(cfg, dims, side, space)
    if space == "latent":  # scaled latents: unit variance
        x = torch.randn(batch, *shape, device=device).contiguous(memory_format=fmt)
    else:
        x = torch.rand(batch, *shape, device=device).mul(2).sub(1).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:  # one eager step: forward + backward
        with autocast(device, variant):
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
            "achieved_tflops": counter.get_total_flops() / seconds / 1e12, "compile_s": compile_s,
            "input_shape": list(shape)}


def ae_train_case(dims, side, batch, steps, device, variant, quick_cpu, ae_channels=None) -> dict:
    """``AutoencoderFit.step`` in both halves of a fit: L1 + KL, then with the patch-GAN too."""
    cfg = config(dims, side, quick_cpu, "latent", [f"autoencoder.batch_size={batch}", *ae_overrides(ae_channels)])
    a = cfg.autoencoder
    torch.manual_seed(0)
    fit = AutoencoderFit(a, dims=dims, in_channels=1, device=device)
    fmt = memory_format(dims, "_cl" in variant)
    fit.model.to(memory_format=fmt)
    if fit.discriminator is not None:
        fit.discriminator.to(memory_format=fmt)
    x = torch.rand(batch, 1, *(side,) * dims, device=device).mul(2).sub(1).contiguous(memory_format=fmt)

    def step():
        with autocast(device, variant):
            fit.step(x)

    # step_count places the step in its half of a fit (the discriminator joins at train_steps // 2).
    phases = {"recon": 0}
    if fit.discriminator is not None:
        phases["adversarial"] = a.train_steps // 2
    flops = {}
    for name, at in phases.items():  # one eager step each
        fit.step_count = at
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
    compile_s = None
    if "compile" in variant:
        torch._dynamo.reset()
        fit.trained = torch.compile(fit.model, dynamic=False)
        if fit.discriminator is not None:
            fit.trained_disc = torch.compile(fit.discriminator, dynamic=False)
        compile_s = 0.0
    seconds = {}
    for name, at in phases.items():
        fit.step_count = at
        if compile_s is not None:  # the discriminator compiles at its half's first step
            t0 = time.perf_counter()
            step()
            sync(device)
            compile_s += time.perf_counter() - t0
        for _ in range(2):  # warm-up
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        seconds[name] = (time.perf_counter() - t0) / steps
    mean_s = statistics.mean(seconds.values())  # a fit spends half its steps in each half
    mean_flops = statistics.mean(flops.values())
    return {"images_per_s": batch / mean_s, "seconds_per_step": mean_s, "flops_per_step": mean_flops,
            "achieved_tflops": mean_flops / mean_s / 1e12, "compile_s": compile_s,
            "phases": {n: {"images_per_s": batch / seconds[n], "seconds_per_step": seconds[n], "flops_per_step": flops[n],
                           "achieved_tflops": flops[n] / seconds[n] / 1e12} for n in phases},
            "autoencoder": {"channels": a.channels, "num_res_blocks": a.num_res_blocks, "attention": a.attention,
                            "latent_channels": a.latent_channels, "adversarial_weight": a.adversarial_weight}}


def sample_case(dims, side, batch, steps, device, variant, quick_cpu, space="pixel", extra=()) -> dict:
    cfg, fit = build(dims, side, batch, device, quick_cpu, space, extra)
    fmt = memory_format(dims, "_cl" in variant)
    model = fit.model.eval().to(memory_format=fmt)
    labels, shape = torch.arange(batch, device=device) % 2, data_shape(cfg, dims, side, space)
    sampler, steps = cfg.sampling.sampler, steps or cfg.sampling.steps
    decoder = None
    if space == "latent":  # the fold's autoencoder decodes the whole batch, as ShardSampler.generate does
        torch.manual_seed(1)
        decoder = build_autoencoder(cfg.autoencoder, dims=dims, in_channels=1).to(device).eval().to(memory_format=fmt)

    def run(m, n_steps):  # -> (seconds sampling, seconds decoding)
        gens = [torch.Generator(device=device).manual_seed(j) for j in range(batch)]
        t0 = time.perf_counter()
        with autocast(device, variant):
            x = fit.process.sample(m, labels, shape, sampler, n_steps, gens)
            sync(device)
            t1 = time.perf_counter()
            if decoder is not None:
                x = decode(decoder, x.float() / LATENT_SCALE)
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    with FlopCounterMode(display=False) as counter:
        run(model, steps)
    compile_s = None
    if "compile" in variant:
        torch._dynamo.reset()
        model = torch.compile(model, dynamic=False)
        if decoder is not None:  # what decode() calls: the instance attribute shadows the method
            decoder.decode = torch.compile(decoder.decode, dynamic=False)
        t0 = time.perf_counter()
        run(model, steps)
        compile_s = time.perf_counter() - t0
    run(model, 2)
    times = [run(model, steps) for _ in range(2)]
    seconds = statistics.median(sum(t) for t in times)
    row = {"samples_per_s": batch / seconds, "seconds_per_batch": seconds, "sampler": sampler, "steps": steps,
           "flops_per_batch": counter.get_total_flops(), "achieved_tflops": counter.get_total_flops() / seconds / 1e12,
           "compile_s": compile_s, "input_shape": list(shape)}
    if decoder is not None:
        row["decode_share"] = statistics.median(t[1] / sum(t) for t in times)
    return row


def plan(spaces, dims_list, quick_cpu, compile_on) -> list[dict]:
    """Every case, eager ones first (latent before pixel), compiled ones last: compile may not fit."""
    size = "cpu" if quick_cpu else "gpu"
    eager, compiled = [], []
    for variant in ["fp32", "bf16", "bf16_cl"] + (["bf16_cl_compile"] if compile_on else []):
        for space in [s for s in ("latent", "pixel") if s in spaces]:
            for dims in dims_list:
                if space == "pixel":
                    side, tb, sb, s_steps, t_steps = CASES[size][dims]
                    todo = [("train", train_case, tb, t_steps, {}), ("sample", sample_case, sb, s_steps, {})]
                else:
                    c = LATENT_CASES[size][dims]
                    side, ae = c["side"], ae_overrides(c["ae_channels"])
                    todo = [("ae_train", ae_train_case, c["ae_batch"], c["ae_steps"], {"ae_channels": c["ae_channels"]}),
                            ("train", train_case, c["train_batch"], c["train_steps"], {"space": "latent", "extra": ae}),
                            ("sample", sample_case, c["sample_batch"], c["sample_steps"], {"space": "latent", "extra": ae})]
                for what, fn, batch, steps, kwargs in todo:
                    if variant == "fp32" and what != "ae_train":
                        continue  # the denoiser trains and samples under bf16 autocast on CUDA
                    job = {"space": space, "dims": dims, "what": what, "variant": variant, "side": side,
                           "batch": batch, "steps": steps, "fn": fn, "kwargs": kwargs}
                    (compiled if "compile" in variant else eager).append(job)
    return eager + compiled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU (with --quick: tiny sizes, to check the code)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto", help="auto: on GPU only")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3])
    p.add_argument("--space", nargs="+", choices=["latent", "pixel"], default=["latent", "pixel"],
                   help="which paths to measure (default both)")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip measurements that would end after this")
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
    compile_on = args.compile == "yes" or (args.compile == "auto" and device.type == "cuda")
    report = {"device": name, "card": card, "peak_bf16_tflops": peak, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "quick_cpu": quick_cpu, "budget_s": args.budget_s,
              "results": [], "skipped": []}
    print(f"device: {name} ({card or 'no peak in table'}; peak bf16 {peak} TFLOP/s)", flush=True)
    eager_s: dict[tuple, float] = {}  # (space, dims, what) -> wall seconds of its last eager case
    longest_compile = None
    for job in plan(args.space, args.dims, quick_cpu, compile_on):
        space, dims, what, variant = job["space"], job["dims"], job["what"], job["variant"]
        key = f"{dims}d {space} {what} {variant}"
        elapsed = time.perf_counter() - t_start
        needs = eager_s.get((space, dims, what), 0.0)
        if "compile" in variant:
            needs += longest_compile if longest_compile is not None else COMPILE_GUESS_S
        if elapsed + needs > args.budget_s:
            report["skipped"].append(key)
            print(f"{key}: skipped (budget: ~{needs:.0f}s needed, {max(0.0, args.budget_s - elapsed):.0f}s left)",
                  flush=True)
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_case = time.perf_counter()
        try:
            row = job["fn"](dims, job["side"], job["batch"], job["steps"], device, variant, quick_cpu, **job["kwargs"])
        except Exception as exc:  # record and go on: one failing case (an OOM) must not lose the rest
            row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        wall = time.perf_counter() - t_case
        if "compile" not in variant:
            eager_s[(space, dims, what)] = wall
        elif row.get("compile_s"):
            longest_compile = max(longest_compile or 0.0, row["compile_s"])
        row.update({"space": space, "dims": dims, "what": what, "variant": variant, "side": job["side"],
                    "batch": job["batch"], "wall_s": wall})
        if peak and "achieved_tflops" in row:
            row["mfu"] = row["achieved_tflops"] / peak
        if device.type == "cuda":
            row["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        report["results"].append(row)
        speed = row.get("images_per_s") or row.get("samples_per_s")
        print(f"{key}: " + (row["error"] if "error" in row else
              f"{speed:9.1f} {'samples' if what == 'sample' else 'images'}/s, {row['achieved_tflops']:.3f} TFLOP/s"
              + (f", MFU {row['mfu']:.1%}" if "mfu" in row else "")
              + (f", peak {row['max_memory_gb']:.1f} GiB" if "max_memory_gb" in row else "")
              + (f", decode {row['decode_share']:.0%} of the time" if "decode_share" in row else "")
              + (f", compile {row['compile_s']:.0f}s" if row.get("compile_s") else "")), flush=True)
        del row
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    report["seconds"] = time.perf_counter() - t_start
    print(f"done in {report['seconds']:.0f}s; {len(report['skipped'])} skipped", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
