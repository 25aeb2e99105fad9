"""Issue 17's cost benchmark: latent against pixel diffusion, training and sampling, 2D and 3D.

What it measures, at 128^2 (2D) and 64^3 (3D), pixel space against the latents of the autoencoder
(``diffusion.space=latent``; MONAI ``AutoencoderKL``, downsampling factor 4, 4 latent channels):

* **training**: images/s of the denoiser's training step (:meth:`GeneratorFit.step`: forward,
  backward, clipping, AdamW, EMA) on pixel inputs against scaled latents; the latent path's
  one-off costs apart: the autoencoder's own training step (:meth:`AutoencoderFit.step`, full
  size) and the encoding of a fold's training images (:func:`encode`);
* **sampling**: samples/s of ``process.sample`` (the default preset's rectified flow, Euler, 10
  steps) at full size against the same on latents plus one :func:`decode` to full size, with
  the decode's share of a latent sample;
* **peak memory** of each configuration: every measurement runs in a fresh Python process, whose
  peak RSS minus its RSS after the imports is reported (model, optimiser, EMA, activations;
  tracemalloc does not see torch's allocations). After the imports the freed heap is trimmed
  and the peak reset to the current RSS (``/proc/self/clear_refs``), since the imports'
  transient peak is larger than some configurations' whole use; the peak read is ``VmHWM``
  (see :func:`_peak_mib` for why not ``ru_maxrss``).

Target (issue 17): a latent sample at 128^2 at least 4x cheaper than a pixel sample at 128^2.

The denoiser is the same in both spaces (same widths, 1 layer per block, the default preset's
flow process, class dropout 0.1, 4 classes), so the comparison isolates the space: 2D
``[32, 64, 128, 128]`` (a realistic 4-level UNet at 128^2; on 32^2 latents it reaches 4^2),
3D ``[16, 32, 64]``. Autoencoder: the config's defaults (``[32, 64, 64]``) in 2D, ``[16, 32, 32]``
in 3D. Weights are untrained: throughput and memory do not depend on them. Inputs are random
in [-1, 1] (pixels) or N(0, 1) (scaled latents). Torch threads: 2 (``--threads``), OpenMP as
raysynth's local Ray workers run it (``runtime.openmp_env``). Each round runs every
configuration once (order flipped in every other round, so pixel and latent rows share the
machine's conditions); within a process, warm-up iterations first, then timed repetitions; the
medians over all timed repetitions are reported. FD (sample quality) is not measured here.

    .venv/bin/python bench/latent.py --quick                     # ~1-2 min smoke run, smaller sizes
    .venv/bin/python bench/latent.py [--json F] [--benchmarks BENCHMARKS.md]   # ~6-9 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# dims -> sizes of the full run and of --quick. side: pixel side; batch: train/encode/sample batch;
# warm-up and timed repetitions per process for (train, autoencoder train, sampling).
SIZES = {
    "full": {
        2: {"side": 128, "denoiser": [32, 64, 128, 128], "autoencoder": [32, 64, 64], "train_batch": 8,
            "encode_batch": 32, "sample_batch": 8, "train_reps": (1, 3), "ae_reps": (1, 3), "sample_reps": (1, 2)},
        3: {"side": 64, "denoiser": [16, 32, 64], "autoencoder": [16, 32, 32], "train_batch": 1,
            "encode_batch": 2, "sample_batch": 1, "train_reps": (1, 2), "ae_reps": (1, 2), "sample_reps": (0, 1)},
    },
    "quick": {
        2: {"side": 64, "denoiser": [32, 64, 128, 128], "autoencoder": [32, 64, 64], "train_batch": 4,
            "encode_batch": 8, "sample_batch": 4, "train_reps": (1, 1), "ae_reps": (1, 1), "sample_reps": (0, 1)},
        3: {"side": 32, "denoiser": [16, 32, 64], "autoencoder": [16, 32, 32], "train_batch": 1,
            "encode_batch": 1, "sample_batch": 1, "train_reps": (1, 1), "ae_reps": (0, 1), "sample_reps": (0, 1)},
    },
}
ROUNDS = {"full": 2, "quick": 1}
NUM_CLASSES = 4
TARGET = 4.0  # latent sampling at 128^2 at least this many times cheaper per sample than pixel sampling
HEADING = "## Latent against pixel diffusion: training, sampling and memory (issue 17)"


# ---- the child: one configuration in a fresh process ----------------------------------------------
def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _peak_mib() -> float:
    """This process's peak RSS (MiB): ``VmHWM``, the address space's high-water mark, which
    :func:`_reset_peak` can reset. ``ru_maxrss`` is the larger of it and a high-water mark that no
    reset clears, which Linux carries over from the address space before ``exec``: a copy of this
    driver's, whose RSS (~700 MiB once ``real_study`` is imported) then hid every small
    configuration's peak. Falls back to ``ru_maxrss`` without /proc."""
    import resource

    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    """Hand the heap that the imports freed back to the system (glibc ``malloc_trim``), then reset
    the peak RSS to the current RSS (Linux ``clear_refs`` 5). Without the first, a configuration
    reuses freed-but-resident heap and its peak reads low; without the second, the imports'
    transient peak (~0.4 GB above what they keep) hides every smaller configuration's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _config(spec: dict):
    from raysynth.config import AutoencoderConfig, load_config

    cfg = load_config("default", overrides=[f"data.dims={spec['dims']}", f"data.image_size={spec['side']}",
                                            f"diffusion.channels={json.dumps(spec['denoiser'])}"])
    ae = AutoencoderConfig(channels=spec["autoencoder"], downsampling_factor=2 ** (len(spec["autoencoder"]) - 1))
    return cfg, ae


def _timed(fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def child(spec: dict) -> dict:
    """Run one configuration; returns its timings and its peak RSS above the post-import baseline."""
    import torch

    from raysynth.diffusion.autoencoder import AutoencoderFit, build_autoencoder, decode, encode, latent_side
    from raysynth.diffusion.networks import build_denoiser
    from raysynth.diffusion.process import build_process
    from raysynth.diffusion.trainer import GeneratorFit

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    torch.ones(64, 64) @ torch.ones(64, 64)  # the thread pool exists before the baseline
    cfg, ae_cfg = _config(spec)
    dims, side, kind = spec["dims"], spec["side"], spec["kind"]
    lat = latent_side(side, ae_cfg)
    pixel_shape, latent_shape = (1,) + (side,) * dims, (ae_cfg.latent_channels,) + (lat,) * dims
    reset = _reset_peak()
    baseline = _peak_mib()  # after the reset: the RSS after the imports
    out: dict = {"baseline_rss_mib": baseline, "peak_reset": reset}

    if kind in ("train_pixel", "train_latent"):
        shape, size = (pixel_shape, side) if kind == "train_pixel" else (latent_shape, lat)
        b = spec["train_batch"]
        fit = GeneratorFit(cfg.diffusion, dims=dims, in_channels=shape[0], image_size=size, num_classes=NUM_CLASSES)
        x = torch.rand(b, *shape) * 2 - 1 if kind == "train_pixel" else torch.randn(b, *shape)
        y = torch.randint(0, NUM_CLASSES, (b,))
        g = torch.Generator().manual_seed(1)
        times = _timed(lambda: fit.step(x, y, g), *spec["train_reps"])
        out.update(times=times, per=b, unit="images")
    elif kind == "ae_train":
        b = spec["train_batch"]
        fit = AutoencoderFit(ae_cfg, dims=dims, in_channels=1)
        x = torch.rand(b, *pixel_shape) * 2 - 1
        g = torch.Generator().manual_seed(1)
        times = _timed(lambda: fit.step(x, None, g), *spec["ae_reps"])
        out.update(times=times, per=b, unit="images")
    elif kind == "encode":
        b = spec["encode_batch"]
        model = build_autoencoder(ae_cfg, dims=dims, in_channels=1).eval()
        x = torch.rand(b, *pixel_shape) * 2 - 1
        times = _timed(lambda: encode(model, x), *spec["ae_reps"])
        out.update(times=times, per=b, unit="images")
    elif kind in ("sample_pixel", "sample_latent"):
        b, steps, s = spec["sample_batch"], spec["steps"], cfg.sampling
        shape, size = (pixel_shape, side) if kind == "sample_pixel" else (latent_shape, lat)
        # what a sampler holds: the network (no optimiser, no EMA copy) and the process
        model = build_denoiser(cfg.diffusion, dims=dims, in_channels=shape[0], image_size=size,
                               num_classes=NUM_CLASSES).eval()
        process = build_process(cfg.diffusion)
        decoder = build_autoencoder(ae_cfg, dims=dims, in_channels=1).eval() if kind == "sample_latent" else None
        labels = torch.arange(b) % NUM_CLASSES
        split = {"denoise": [], "decode": []}

        def run(n_steps: int) -> None:
            gens = [torch.Generator().manual_seed(j) for j in range(b)]
            t0 = time.perf_counter()
            x = process.sample(model, labels, shape, s.sampler, n_steps, gens, guidance_scale=s.guidance_scale)
            t1 = time.perf_counter()
            if decoder is not None:
                x = decode(decoder, x / 1.0)  # the scale factor's division: 1 for untrained weights
            split["denoise"].append(t1 - t0)
            split["decode"].append(time.perf_counter() - t1)

        warmup, reps = spec["sample_reps"]
        for _ in range(warmup):
            run(1)  # one step: builds every kernel of the timed runs, at a tenth of their cost
        split = {"denoise": [], "decode": []}
        times = _timed(lambda: run(steps), 0, reps)
        out.update(times=times, per=b, unit="samples", sampler=s.sampler, steps=steps,
                   denoise_s=split["denoise"], decode_s=split["decode"])
    else:
        raise ValueError(f"unknown configuration {kind!r}")
    import resource

    out["peak_rss_mib"] = _peak_mib()
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # for comparison
    out["peak_delta_mib"] = out["peak_rss_mib"] - baseline
    return out


# ---- the driver -------------------------------------------------------------------------------------
def spawn(spec: dict) -> dict:
    from raysynth.runtime import openmp_env

    env = {**os.environ, **openmp_env(), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{spec['kind']} {spec['dims']}D failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(results: list[dict]) -> dict:
    times = [t for r in results for t in r["times"]]
    sec = statistics.median(times)
    out = {"seconds_per_call": sec, "per_s": results[0]["per"] / sec, "unit": results[0]["unit"],
           "per_call": results[0]["per"], "timed": len(times), "times": times,
           "peak_delta_mib": max(r["peak_delta_mib"] for r in results),
           "baseline_rss_mib": statistics.median(r["baseline_rss_mib"] for r in results),
           "peak_reset": all(r["peak_reset"] for r in results)}
    if "decode_s" in results[0]:
        out["denoise_s"] = statistics.median(t for r in results for t in r["denoise_s"])
        out["decode_s"] = statistics.median(t for r in results for t in r["decode_s"])
    return out


def per_fold(d: dict) -> dict:
    """Estimated training seconds of one fold at the config's defaults, from the measured throughputs
    (assumes images/s does not change from the measured batch to the config's batch)."""
    from raysynth.config import AutoencoderConfig, DiffusionConfig

    dc, ac = DiffusionConfig(), AutoencoderConfig()
    denoiser_images, n = dc.train_steps * dc.batch_size, dc.max_train_images
    pixel = denoiser_images / d["train_pixel"]["per_s"]
    ae = ac.train_steps * ac.batch_size / d["ae_train"]["per_s"]
    enc = n / d["encode"]["per_s"]
    latent = denoiser_images / d["train_latent"]["per_s"]
    return {"pixel_s": pixel, "latent_total_s": ae + enc + latent, "autoencoder_s": ae, "encode_s": enc,
            "latent_denoiser_s": latent, "assumes": f"denoiser {dc.train_steps} steps x batch {dc.batch_size}, "
            f"autoencoder {ac.train_steps} x {ac.batch_size}, {n} training images encoded"}


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def tables(report: dict) -> list[str]:
    lines = ["| dims | space (denoiser input) | train: denoiser step, images/s | peak RSS, train (MiB) | "
             "sample: samples/s (Euler 10 + decode) | peak RSS, sample (MiB) |", "|---|---|---|---|---|---|"]
    for dims, d in report["results"].items():
        sz = report["sizes"][dims]
        side, lat = sz["side"], sz["side"] // 4
        sup = "²" if dims == "2" else "³"
        tp, tl, sp, sl = d["train_pixel"], d["train_latent"], d["sample_pixel"], d["sample_latent"]
        lines.append(f"| {dims}D | pixel ({side}{sup}) | {fmt(tp['per_s'])} | {tp['peak_delta_mib']:.0f} | "
                     f"{fmt(sp['per_s'])} | {sp['peak_delta_mib']:.0f} |")
        lines.append(f"| {dims}D | latent (4 x {lat}{sup}) | {fmt(tl['per_s'])} | {tl['peak_delta_mib']:.0f} | "
                     f"{fmt(sl['per_s'])} (decode {sl['decode_s'] / sl['seconds_per_call']:.0%} of it) | "
                     f"{sl['peak_delta_mib']:.0f} |")
        rounds = {k: ", ".join(f"{x:.1f}" for x in v) for k, v in d["round_ratios"].items()}
        lines.append(f"| {dims}D | **latent / pixel** (each round's) | **{tl['per_s'] / tp['per_s']:.1f}x** "
                     f"({rounds['train']}) | {ratio(tl['peak_delta_mib'], tp['peak_delta_mib'])} | "
                     f"**{sl['per_s'] / sp['per_s']:.1f}x** ({rounds['sample']}) | "
                     f"{ratio(sl['peak_delta_mib'], sp['peak_delta_mib'])} |")
    lines += ["", "| dims | latent path's one-off costs | images/s | peak RSS (MiB) |", "|---|---|---|---|"]
    for dims, d in report["results"].items():
        sz = report["sizes"][dims]
        sup = "²" if dims == "2" else "³"
        lines.append(f"| {dims}D | autoencoder training step at {sz['side']}{sup} (batch {sz['train_batch']}) | "
                     f"{fmt(d['ae_train']['per_s'])} | {d['ae_train']['peak_delta_mib']:.0f} |")
        lines.append(f"| {dims}D | encode at {sz['side']}{sup} (batch {sz['encode_batch']}) | "
                     f"{fmt(d['encode']['per_s'])} | {d['encode']['peak_delta_mib']:.0f} |")
    return lines


def section(report: dict, args) -> str:
    m, lines = report["machine"], []
    command = "--quick " if args.quick else ""
    r2 = report["results"].get("2")
    verdict = ""
    if r2:
        gain = r2["sample_latent"]["per_s"] / r2["sample_pixel"]["per_s"]
        side = report["sizes"]["2"]["side"]
        verdict = (f"Target (latent sampling at 128² at least {TARGET:g}x cheaper per sample than pixel): "
                   f"**{'MET' if gain >= TARGET and side == 128 else 'MISSED' if side == 128 else 'not judged (--quick)'}**, "
                   f"{gain:.1f}x at {side}².")
    folds = []
    for dims, d in report["results"].items():
        f = d["per_fold"]
        folds.append(f"{dims}D pixel {f['pixel_s'] / 3600:.2g} h, latent {f['latent_total_s'] / 3600:.2g} h (autoencoder "
                     f"{f['autoencoder_s'] / 3600:.2g} h + encode {f['encode_s']:.0f} s + denoiser "
                     f"{f['latent_denoiser_s'] / 3600:.2g} h)")
    fold = (f"Estimated training time of one fold on this machine at the config's defaults ({f['assumes']}), from "
            "the throughputs above, assuming images/s does not change with the batch: " + "; ".join(folds) + ".")
    if not all(r.get("peak_reset", True) for d in report["results"].values() for r in d.values()):
        fold += " (The peak RSS could not be reset after the imports: small peaks read as 0.)"
    lines += [
        HEADING, "",
        f"Date: {m['date']}. Machine: {m['cpus']} cores of {m['cpu']}, no GPU, shared with other jobs (load average "
        f"{m['loadavg_start']:.1f} at the start, {m['loadavg_end']:.1f} at the end); torch {m['torch']}, "
        f"{report['threads']} torch threads, GOMP_SPINCOUNT={m['gomp_spincount']}. Command: "
        f"`.venv/bin/python bench/latent.py {command}--benchmarks BENCHMARKS.md` ({report['wall_s'] / 60:.1f} min).",
        "",
        "Method: every configuration in a fresh process, " + f"{report['rounds']} round(s), the order flipped each round; "
        "warm-up iterations, then timed repetitions; medians over all timed repetitions (in brackets: the ratio "
        "within each round, whose pixel and latent processes ran back to back). Same denoiser in both spaces (widths "
        f"{report['sizes']['2']['denoiser']} in 2D, {report['sizes']['3']['denoiser']} in 3D, 1 layer per block, the "
        "default preset's rectified flow with class dropout 0.1, 4 classes); latents from MONAI AutoencoderKL with factor "
        f"4 and 4 latent channels (widths {report['sizes']['2']['autoencoder']} in 2D, the config default, and "
        f"{report['sizes']['3']['autoencoder']} in 3D). Training: `GeneratorFit.step` (fp32, AdamW, clipping, EMA) at "
        f"batch {report['sizes']['2']['train_batch']} (2D) / {report['sizes']['3']['train_batch']} (3D). Sampling: "
        f"`process.sample`, Euler {report['steps']} steps, batch {report['sizes']['2']['sample_batch']} (2D) / "
        f"{report['sizes']['3']['sample_batch']} (3D); a latent sample adds one `decode` to full size. Peak RSS: the "
        "process's peak RSS (`VmHWM`, reset after the imports; `ru_maxrss` cannot be reset) minus its RSS after the "
        "imports (network, optimiser, EMA, activations; the training "
        "set itself is not held). Untrained weights (cost does not depend on them). Sample quality (FD) is not "
        "measured here: another benchmark measures fidelity.",
        "",
        *tables(report),
        "",
        verdict,
        "",
        fold,
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (64^2, 32^3), 1 round: a ~1-2 minute smoke run")
    p.add_argument("--dims", type=int, nargs="+", choices=[2, 3], default=[2, 3])
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (the default preset's Euler 10)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per process (the machine's 2 cores)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--benchmarks", type=Path, help="write the section into this Markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    import torch

    from real_study import cpu  # noqa: E402 (bench/ is on sys.path when this file runs)
    from raysynth.runtime import openmp_env

    mode = "quick" if args.quick else "full"
    rounds = args.rounds or ROUNDS[mode]
    t_start = time.perf_counter()
    machine = {"cpu": cpu(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d"), "loadavg_start": os.getloadavg()[0],
               "gomp_spincount": os.environ.get("GOMP_SPINCOUNT") or openmp_env().get("GOMP_SPINCOUNT", "libgomp default")}
    print(f"machine: {machine['cpus']} cores of {machine['cpu']}; torch {machine['torch']}, {args.threads} threads; "
          f"load average {machine['loadavg_start']:.1f}; {rounds} round(s), sizes: {mode}", flush=True)
    kinds = ["train_pixel", "train_latent", "ae_train", "encode", "sample_pixel", "sample_latent"]
    raw: dict[str, dict[str, list]] = {str(d): {k: [] for k in kinds} for d in args.dims}
    for rnd in range(rounds):
        order = kinds if rnd % 2 == 0 else kinds[::-1]
        for dims in args.dims:
            for kind in order:
                spec = {**SIZES[mode][dims], "dims": dims, "kind": kind, "threads": args.threads, "steps": args.steps}
                t0 = time.perf_counter()
                r = spawn(spec)
                raw[str(dims)][kind].append(r)
                print(f"  round {rnd + 1}/{rounds} {dims}D {kind:<13} {r['per'] / statistics.median(r['times']):8.3g} "
                      f"{r['unit']}/s, peak +{r['peak_delta_mib']:.0f} MiB ({time.perf_counter() - t0:.0f}s with start-up)",
                      flush=True)
    results = {d: {k: summarise(v) for k, v in by_kind.items()} for d, by_kind in raw.items()}
    for dims, d in results.items():
        d["per_fold"] = per_fold(d)
        rate = lambda r: r["per"] / statistics.median(r["times"])  # noqa: E731
        d["round_ratios"] = {what: [rate(lat) / rate(pix) for pix, lat in zip(raw[dims][f"{what}_pixel"],
                                                                                raw[dims][f"{what}_latent"])]
                             for what in ("train", "sample")}
    machine["loadavg_end"] = os.getloadavg()[0]
    report = {"machine": machine, "threads": args.threads, "rounds": rounds, "steps": args.steps, "mode": mode,
              "sizes": {str(d): SIZES[mode][d] for d in (2, 3)}, "results": results,
              "wall_s": time.perf_counter() - t_start}
    if set(args.dims) == {2, 3}:
        text = section(report, args)
        print("\n" + text)
        if args.benchmarks:
            import real_study

            real_study.HEADING = HEADING  # its update_benchmarks replaces or appends the section under HEADING
            real_study.update_benchmarks(args.benchmarks, text)
            print(f"wrote {args.benchmarks}")
    else:
        print("\n".join(tables(report)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
