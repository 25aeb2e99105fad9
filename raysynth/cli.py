"""``raysynth``: thin command wrappers over the stages. All logic lives in the library modules."""

from __future__ import annotations

import argparse
import builtins
import functools
import json
import logging
import sys
import time
from typing import Optional, Sequence

from raysynth.artifacts import Layout
from raysynth.config import ConfigError, load_config, preset_names
from raysynth.console import LOG_NAME, Console, one_line
from raysynth.errors import PrivacyGateError, RaysynthError
from raysynth.runtime import release_ray

log = logging.getLogger("raysynth")

COMMANDS = {
    "config": "print the fully resolved config as YAML",
    "prepare": "preprocess real scans: data.parquet, fingerprint.json, splits.json",
    "tune": "Ray Tune search over diffusion gamma and learning rate (and process), scored on sample FD",
    "autoencoder": "latent space only: train one autoencoder per fold with Ray Train",
    "train": "train one generator per fold with Ray Train (on the autoencoder's latents in latent space)",
    "sample": "sample synthetic shards per fold with Ray Data",
    "quality": "fidelity, diversity and the memorisation (privacy) gate",
    "study": "Ray Tune grid of downstream CNNs: arm x ratio x real-data size x fold x seed",
    "robustness": "study models on corrupted test parts and an external test set, without retraining",
    "report": "paired statistics, figures, report.json, report.html and report.md",
    "pipeline": "all stages, skipping finished work",
    "status": "what an output holds: each stage complete, partial or stale, the figures so far, the report",
}


def version_text() -> str:
    """``raysynth 0.1.0 (ray 2.60.0, torch 2.13.0, diffusers 0.42.1, monai 1.6.1)``, read from the
    installed distributions without importing them."""
    import importlib.metadata as md

    def of(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    return f"raysynth {of('raysynth')} (" + ", ".join(f"{n} {of(n)}" for n in ("ray", "torch", "diffusers", "monai")) + ")"


def config_diff(cfg) -> str:
    """The keys of ``cfg`` whose values differ from the defaults, as YAML (``{}`` when none)."""
    import yaml

    def diff(a: dict, b: dict) -> dict:
        out = {}
        for key, value in a.items():
            if isinstance(value, dict) and isinstance(b.get(key), dict):
                sub = diff(value, b[key])
                if sub:
                    out[key] = sub
            elif b.get(key) != value:
                out[key] = value
        return out

    changed = diff(cfg.to_dict(), load_config("default").to_dict())
    return yaml.safe_dump(changed, sort_keys=False) if changed else "{}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysynth", description="Synthetic MRI with diffusion models on Ray.")
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print raysynth's version and those of Ray, torch, diffusers and MONAI")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE.yaml", help="a YAML config (merged over the preset)")
        p.add_argument("--preset", default="default", choices=preset_names(), help="base settings (default: default)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                       help="override one config value; repeatable (e.g. --set sampling.ratio=2)")
        p.add_argument("--data", metavar="PATH", help="class-folder image set or NIfTI folder; default: embedded cohort")
        p.add_argument("--dims", type=int, choices=(2, 3), help="2D images or 3D volumes (data.dims)")
        p.add_argument("--task", choices=("classification", "segmentation"), help="downstream task (data.task)")
        if name == "config":
            p.add_argument("--diff", action="store_true", help="print only what differs from the defaults")
        if name == "status":  # reads the artifacts only: no --out, --force or -q
            p.add_argument("out", nargs="?", metavar="OUT", help="output root, a folder or a URI (default: runs/<preset>)")
            p.add_argument("--json", action="store_true", help="print the status as strict JSON")
            p.add_argument("--external-test", metavar="PATH", help="the external test set the run used, if any")
        if name not in ("config", "status"):
            p.add_argument("--out", metavar="DIR|URI",
                           help="output root: a folder, or a URI such as s3://bucket/run1 (default: runs/<preset>)")
            p.add_argument("--force", action="store_true", help="redo the stage even if its artifact is complete")
            p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
            p.add_argument("-v", "--verbose", action="store_true",
                           help="show Ray's own output and every detail on the console (default: OUT/logs/ray.log)")
        if name in ("autoencoder", "train", "sample"):
            p.add_argument("--folds", type=int, nargs="+", metavar="K", help="only these folds")
        if name in ("robustness", "report", "pipeline"):
            p.add_argument("--external-test", metavar="PATH",
                           help="external test set (class folders or NIfTI + labels.csv), never trained or selected on")
        if name == "sample":
            p.add_argument("--num-samples", type=int, metavar="N",
                           help="synthetic samples per fold (grows or shrinks an existing set; overrides the ratio)")
    return parser


def resolve_config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.data is not None:
        # JSON is valid YAML: a path is taken literally ("#", "null", "~" or digits stay a path).
        overrides.insert(0, f"data.source={json.dumps(args.data)}")
    if args.dims is not None:
        overrides.insert(0, f"data.dims={args.dims}")
    if args.task is not None:
        overrides.insert(0, f"data.task={args.task}")
    if getattr(args, "external_test", None) is not None:
        overrides.insert(0, f"robustness.external_test={json.dumps(args.external_test)}")
    return load_config(args.preset, args.config, overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in ("config", "status"):  # the commands that run stages log through raysynth.console
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = None
    try:
        cfg = resolve_config(args)
        if args.command == "config":
            sys.stdout.write(config_diff(cfg) if args.diff else cfg.to_yaml())
            return 0
        if args.command == "status":
            return _status(args, cfg)
        layout = Layout.at(args.out or f"runs/{args.preset}")
        console = Console(layout.logs / LOG_NAME, verbose=args.verbose, quiet=args.quiet,
                          title=" ".join(sys.argv[1:] if argv is None else argv))
        with console:
            try:
                return _run(args, cfg, layout, console)
            finally:
                release_ray()  # while the console is open: what Ray prints on the way out goes to the log
    except (ConfigError, RaysynthError) as exc:
        where = console.details if console is not None and not isinstance(exc, PrivacyGateError) else ""
        print(f"raysynth: error: {one_line(exc)}{where}", file=sys.stderr)
        return 3 if isinstance(exc, PrivacyGateError) else 2
    except KeyboardInterrupt:
        print("raysynth: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # not ours (a bug, or Ray failing): one line here, the traceback in the log
        if console is None or console.verbose:
            raise
        print(f"raysynth: error: {one_line(exc)}{console.details}", file=sys.stderr)
        return 1


def _status(args: argparse.Namespace, cfg) -> int:
    from raysynth.io import strict
    from raysynth.status import collect, open_output, render

    status = collect(open_output(args.out or f"runs/{args.preset}"), cfg)
    print(json.dumps(strict(status), indent=2, allow_nan=False) if args.json else "\n".join(render(status)))
    return 0


def _run(args: argparse.Namespace, cfg, layout: Layout, console: Console) -> int:
    from raysynth.pipeline import run_pipeline, run_stage
    from raysynth.render.report import summary_lines

    print = functools.partial(builtins.print, file=console.stdout)  # noqa: A001  (sys.stdout is the log file now)
    t0 = time.time()
    if args.command == "pipeline":
        try:
            result = run_pipeline(cfg, layout, force=args.force)
        except PrivacyGateError as exc:  # the run finished; print its summary, then the gate's verdict
            if getattr(exc, "outcome", None):
                for line in summary_lines(exc.outcome["report"]):
                    print("  " + line)
            raise
        print(f"\nraysynth pipeline finished in {time.time() - t0:.0f}s; report: {layout.report / 'report.md'}"
              + (f" (pushed to {layout.remote})" if layout.remote else ""))
        for line in summary_lines(result["report"]):
            print("  " + line)
        print(f"Ray's output and details: {console.log_path}")
        return 0
    result = run_stage(args.command, cfg, layout, force=args.force, folds=getattr(args, "folds", None),
                       num_samples=getattr(args, "num_samples", None))
    if args.command == "report":
        for line in summary_lines(result):
            print("  " + line)
    if args.command == "tune":
        best = result["best"]
        gamma = f" gamma={best['gamma']:.4g}" if best.get("gamma") is not None else ""
        print(f"  best {best['process']}{gamma} lr={best['learning_rate']:.3g}: FD {best['best_fd']:.4g} "
              f"(real-vs-real {result['reference_fd']:.4g})")
        print(f"  next: raysynth train --config {layout.tune / 'best.yaml'}")
    print(f"raysynth {args.command} finished in {time.time() - t0:.0f}s; output in {layout.location}")
    print(f"Ray's output and details: {console.log_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
