"""Command line: ``python -m tokenmix train --key value ...`` (the fields of RunConfig).

Examples::

    python -m tokenmix train --method cutmix --epochs 10
    python -m tokenmix train --method mixup_cutmix --model deit_tiny_patch16_224 --dataset cifar100 --img_size 32
    torchrun --nproc_per_node=2 -m tokenmix train --method cutmix --run_id ddp_test
    python -m tokenmix methods          # list methods and their parameters
    python -m tokenmix models           # list models
    python -m tokenmix report --runs runs --figures figures   # tables + figures from run records
    python -m tokenmix bench            # the overhead suite: step time + memory vs CutMix -> figures/bench.md
    python -m tokenmix bench --methods transmix,tl_align,tl_align:path=kdim   # just these, printed
    python -m tokenmix teacher --dataset fashion_mnist --img_size 28   # TokenMix teacher-map cache
    python -m tokenmix train --method tokenmix                          # ... then train with it
    python -m tokenmix sweep configs/fmnist_cpu.yaml    # a grid of runs (papermill); --smoke, --dry-run
    python -m tokenmix train --method transmix --dry-run    # validate, say what would happen, write nothing

Bad input (an unknown value, a missing dataset, a device this machine lacks, a run another
process holds, a damaged record) ends in one line ``tokenmix: error: ...`` and exit code 2, before
anything is written; ``--debug`` (or ``TOKENMIX_DEBUG=1``) shows the traceback too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
import warnings
from pathlib import Path

from tokenmix import methods
from tokenmix.analysis.bench import format_results, run_suite, step_time_ratios
from tokenmix.methods.teacher_maps import DEFAULT_TEACHER, TeacherCacheError
from tokenmix.models import CCT_PRESETS, CNN_PRESETS, PRESETS, TIMM_FAMILIES, TINY_MODELS, available_models
from tokenmix.report import main as report_main
from tokenmix.train.config import CliParser, ConfigError, RunConfig, debug_enabled
from tokenmix.train.engine import plan_run, train
from tokenmix.train.runs import DamagedRecordError, RecordWarning, RunExistsError, RunLockedError
from tokenmix.train.sweep import main as sweep_main
from tokenmix.train.teacher import build_teacher_maps


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _parse_dict(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({e})") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return d


def config_parser(prog: str = "python -m tokenmix train") -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per RunConfig field (typed; defaults left unset)."""
    p = CliParser(prog=prog, description="Train one run (fields of tokenmix.RunConfig).",
                  argument_default=argparse.SUPPRESS, allow_abbrev=False)
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        t = hints[f.name]
        conv = {bool: _parse_bool, dict: _parse_dict}.get(t, t)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        p.add_argument(f"--{f.name}", type=conv, metavar=t.__name__.upper(), help=f"default: {default!r}")
    return p


def _bench(argv: list[str]) -> int:
    p = CliParser(
        prog="python -m tokenmix bench",
        description="Training-step time and peak memory of the methods relative to CutMix (one process, methods "
                    "interleaved). Without --methods: the full suite (every method on the CPU preset and on a "
                    "DeiT-S-shaped model at 32 px, TokenMixup's saliency latencies, the targets), written to "
                    "<out>/bench.{csv,md} for the README.")
    p.add_argument("--methods", default="",
                   help="only these specs, printed (not written): comma-separated, or ';'-separated when specs carry "
                        "parameters, e.g. 'transmix;tl_align:path=kdim,variant=paper'")
    p.add_argument("--out", default="figures", help="folder of bench.csv / bench.md (suite only; default: figures)")
    p.add_argument("--data_dir", default="data", help="where the teacher caches are (TokenMix)")
    p.add_argument("--model", default="vit_cpu")
    p.add_argument("--img_size", type=int, default=28)
    p.add_argument("--in_chans", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="with --methods: also measure peak memory")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    args = p.parse_args(argv)
    try:
        if not args.methods:
            suite = run_suite(data_dir=args.data_dir, device=args.device, log=lambda m: print(m, flush=True))
            paths = suite.write(args.out)
            print(suite.markdown())
            print("wrote " + ", ".join(map(str, paths)))
            return 0
        sep = ";" if ";" in args.methods else ","
        specs = [s.strip() for s in args.methods.split(sep) if s.strip()]
        res = step_time_ratios(specs, model=args.model, img_size=args.img_size, in_chans=args.in_chans,
                               batch_size=args.batch_size, warmup=args.warmup, repeats=args.repeats,
                               memory=args.memory, device=args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if debug_enabled():
            raise
        print(f"tokenmix bench: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_results(res))
    return 0


def _teacher(argv: list[str]) -> int:
    p = CliParser(prog="python -m tokenmix teacher",
                                description="Train (or load) a teacher and cache its top-k class activation maps "
                                            "for TokenMix labels (one cache per dataset, resolution and teacher).")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--img_size", type=int, default=28)
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="a create_model name (the architecture and the cache tag)")
    p.add_argument("--checkpoint", default="", help="load the teacher instead: a tokenmix run folder or a .pt state dict")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--path", default="", help="cache folder (default <data_dir>/teacher_maps/<dataset>-<img_size>px-<teacher>)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--train_subset", type=int, default=0, help="train the teacher on a subset (maps cover the whole split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid cache exists")
    a = p.parse_args(argv)
    for name, ok, rule in (("--img_size", a.img_size >= 1, ">= 1"), ("--epochs", a.epochs >= 1, ">= 1"),
                           ("--batch_size", a.batch_size >= 1, ">= 1"), ("--top_k", a.top_k >= 1, ">= 1"),
                           ("--lr", math.isfinite(a.lr) and a.lr > 0, "a finite number > 0"),
                           ("--train_subset", a.train_subset >= 0, ">= 0 (0 = all)")):
        if not ok:
            p.error(f"argument {name}: must be {rule}, got {getattr(a, name[2:])}")
    if a.checkpoint and not Path(a.checkpoint).exists():
        p.error(f"argument --checkpoint: {a.checkpoint} does not exist (a tokenmix run folder or a .pt state dict)")
    try:
        build_teacher_maps(a.dataset, a.img_size, a.teacher, a.data_dir, a.path or None, a.checkpoint, a.epochs,
                           a.batch_size, a.lr, a.top_k, a.train_subset, force=a.force, device=a.device)
    except (ValueError, FileNotFoundError) as e:
        if debug_enabled():
            raise
        print(f"tokenmix teacher: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


#: errors that are the user's input or the state of their files: one line and exit code 2
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, RunExistsError, RunLockedError, TeacherCacheError,
                                                DamagedRecordError, FileNotFoundError)


_shown: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, RecordWarning):
        if str(message) not in _shown:  # readers may meet the same damaged file several times
            _shown.add(str(message))
            print(f"tokenmix: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_enabled()
    argv = [a for a in argv if a != "--debug"]
    before = os.environ.get("TOKENMIX_DEBUG")
    if debug:
        os.environ["TOKENMIX_DEBUG"] = "1"  # the subcommands that print their own errors re-raise
    warnings.showwarning = _show_warning
    try:
        return _dispatch(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        cmd = argv[0] if argv else ""
        print(f"tokenmix{' ' + cmd if cmd else ''}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a run that diverged: its record says failed; not an input error
        if debug:
            raise
        print(f"tokenmix{' ' + argv[0] if argv else ''}: run failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = _default_showwarning
        if before is None:
            os.environ.pop("TOKENMIX_DEBUG", None)
        else:
            os.environ["TOKENMIX_DEBUG"] = before


def _dispatch(argv: list[str]) -> int:
    commands = ("train", "methods", "models", "report", "bench", "teacher", "sweep")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in commands:
        print(f"tokenmix: unknown command {cmd!r}; valid: {', '.join(commands)}", file=sys.stderr)
        return 2
    if cmd in ("methods", "models") and rest:
        print(f"tokenmix {cmd}: error: unexpected argument(s) {' '.join(rest)}; `tokenmix {cmd}` takes none",
              file=sys.stderr)
        return 2
    if cmd == "methods":
        for name in methods.available():
            params = {k: v for k, v in methods.parameters(name).items() if k != "num_classes"}
            print(f"{name:14s} " + ", ".join(f"{k}={v!r}" for k, v in params.items()))
        return 0
    if cmd == "models":
        for name, preset in PRESETS.items():
            print(f"{name:16s} {preset.description}")
        for name, cct in CCT_PRESETS.items():
            print(f"{name:16s} {cct.description}")
        for name, (_, desc) in CNN_PRESETS.items():
            print(f"{name:16s} {desc}")
        n_presets = len(PRESETS) + len(CCT_PRESETS) + len(CNN_PRESETS)
        print(f"{', '.join(TINY_MODELS)}: tiny models of each backbone family (tests, smoke runs)")
        n = len(available_models()) - n_presets - len(TINY_MODELS)
        print(f"... and {n} timm models ({', '.join(p + '*' for p in TIMM_FAMILIES)})")
        return 0
    if cmd == "bench":
        return _bench(rest)
    if cmd == "teacher":
        return _teacher(rest)
    if cmd == "sweep":
        return sweep_main(rest)
    if cmd == "report":
        return report_main(rest)
    parser = config_parser()
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="validate everything train would check, say what it would do, write nothing")
    args = vars(parser.parse_args(rest))
    dry = args.pop("dry_run", False)
    cfg = RunConfig.from_dict(args)
    if dry:
        state = plan_run(cfg)
        where = f"{cfg.out_dir}/{cfg.run_id}" if cfg.run_id else f"{cfg.out_dir}/<new timestamped run id>"
        print(f"tokenmix train: valid; {where}: {state}")
        return 0
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
