"""Tables and figures from run records (pure functions of ``runs/<run_id>/`` files).

The layer's face exports the figures and tables every notebook uses; each paper's figures live in
its own module (:mod:`tokenmix.report.transmix`, :mod:`~tokenmix.report.tokenmix`,
:mod:`~tokenmix.report.tokenmixup`, :mod:`~tokenmix.report.smmix`, :mod:`~tokenmix.report.tlalign`;
the study's in :mod:`~tokenmix.report.study`). The report trains no model: the small experiments
behind some figures are in :mod:`tokenmix.analysis.experiments`.

``python -m tokenmix report --runs runs --figures figures`` (``make figures``) calls :func:`main`,
which writes ``training_curves.{png,svg}``, ``results.md``, ``results.csv`` and ``paired.csv`` (each
method's paired difference to CutMix) from the complete runs, ``ablation.{md,csv}`` when some are
``compose`` runs (each label rule's paired difference to the area label on the same mask), and ``tokenmix_occlusion.{png,svg,csv}`` (TokenMix's Figure 5) when there are complete
Fashion-MNIST runs of CutMix and TokenMix (:func:`~tokenmix.report.tokenmix.write_tokenmix_occlusion`).
The notebooks show the same functions' figures.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenmix.report.fidelity import write_label_fidelity
from tokenmix.report.figures import (find_root, plot_curves, save_and_close, show_attention, show_images,
                                     show_mixed_batch, write_csv, write_if_changed)
from tokenmix.report.regime import write_regime_report
from tokenmix.report.study import MAIN_TABLES, paper_table_markdown, write_study_figures
from tokenmix.report.tables import (ablation_markdown, ablation_table, markdown_table, mixed_targets_table, paired_table, results_display,
                                    results_markdown, results_table, summary_table)
from tokenmix.report.tokenmix import OCCLUSION_METHODS, write_tokenmix_occlusion
from tokenmix.train.config import CliParser
from tokenmix.train.runs import folder_problem, list_runs

#: files written by :func:`main` into the figures folder
OUTPUTS: tuple[str, ...] = ("training_curves.png", "training_curves.svg", "results.md", "results.csv", "paired.csv")

def write_report(runs_dir: str | Path, figures_dir: str | Path) -> list[Path]:
    """Write the report files for the complete runs under ``runs_dir``; returns the paths
    (empty, writing nothing, when there is no complete run). Same records -> same bytes."""

    runs = [r for r in list_runs(runs_dir) if r.complete]
    if not runs:
        return []
    out = Path(figures_dir)
    paths = save_and_close(plot_curves(runs), out / "training_curves")
    df, paired = results_table(runs), paired_table(runs)
    write_csv(out / "results.csv", df)
    write_csv(out / "paired.csv", paired)
    write_if_changed(out / "results.md", results_markdown(df, paired).encode())
    paths += [out / "results.md", out / "results.csv", out / "paired.csv"]
    ablation = ablation_table(runs)
    if len(ablation):  # the masks x label rules grid (configs/fmnist_ablation.yaml)
        write_csv(out / "ablation.csv", ablation)
        write_if_changed(out / "ablation.md", ablation_markdown(ablation).encode())
        paths += [out / "ablation.md", out / "ablation.csv"]
    return paths

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"

def update_readme(readme: str | Path, markdown: str, block: str = "results") -> bool:
    """Replace the text between the ``<!-- {block}:start -->`` / ``<!-- {block}:end -->`` markers
    of ``readme`` with ``markdown``; returns True when the file changed.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    path = Path(readme)
    text = path.read_text()
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{path} has no '{start}' ... '{end}' block to fill")
    new = text[:i + len(start)] + "\n" + markdown.strip() + "\n" + text[j:]
    return write_if_changed(path, new.encode())

def provenance(runs_dir: str | Path) -> str:
    """One line naming when and where the complete runs under ``runs_dir`` were made (from their
    records, so it changes only when the runs do)."""
    sums = [r.summary for r in list_runs(runs_dir) if r.complete]
    if not sums:
        return ""
    days = sorted({str(s.get("finished_at", ""))[:10] for s in sums if s.get("finished_at")})
    when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}" if days else "unknown dates"
    where = sorted({f"{s.get('device', '?')} ({s.get('machine', '?')}, {s.get('threads', '?')} threads), "
                    f"torch {s.get('torch', '?')}, timm {s.get('timm', '?')}" for s in sums})
    return f"{len(sums)} runs, finished {when} on {'; '.join(where)}."

def _strip_title(md: str) -> str:
    """A generated Markdown file without its own ``# title`` line."""
    return md.split("\n", 1)[1].lstrip("\n") if md.startswith("# ") else md

#: README blocks filled from generated Markdown files: block name -> file in the figures folder
README_BLOCKS = {"results": "results.md", "regime": "regime.md", "fidelity": "label_fidelity.md", "bench": "bench.md"}

def fill_readme(readme: str | Path, figures_dir: str | Path, runs_dir: str | Path) -> bool:
    """Paste each generated table of :data:`README_BLOCKS` that exists into its block of
    ``readme`` (blocks the README lacks are skipped; the results table gets its provenance line),
    and the papers' main tables into the ``papers`` block. Returns True when the file changed."""
    changed = False
    for block, name in README_BLOCKS.items():
        f = Path(figures_dir) / name
        if f.is_file() and f"<!-- {block}:start -->" in Path(readme).read_text():
            md = _strip_title(f.read_text())
            if block == "results":
                md = md.replace("from the complete run records; do not edit.",
                                f"from the complete run records in `{runs_dir}/`; do not edit. "
                                + provenance(runs_dir), 1)
            changed |= update_readme(readme, md, block)
    if "<!-- papers:start -->" in Path(readme).read_text():
        changed |= update_readme(readme, paper_table_markdown(sources=MAIN_TABLES), "papers")
    return changed

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenmix report [--runs DIR] [--figures DIR]``; returns the exit code."""
    p = CliParser(prog="python -m tokenmix report", description="Figures and results tables from the run records.")
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of run records (default: runs)")
    p.add_argument("--figures", default="figures", metavar="DIR", help="output folder (default: figures)")
    p.add_argument("--data_dir", default="data", metavar="DIR",
                   help="datasets and the teacher cache, for the label-fidelity benchmark (default: data)")
    p.add_argument("--regime", default=None, metavar="DIR",
                   help="also report the regime pilot's records in DIR (regime.{png,svg,csv,md})")
    p.add_argument("--readme", default=None, metavar="FILE",
                   help="also paste the results table between the results markers of FILE (e.g. README.md)")
    args = p.parse_args(None if argv is None else list(argv))
    if not Path(args.runs).is_dir():
        p.error(f"argument --runs: {args.runs} is not a folder (of run records, e.g. results/fmnist_cpu)")
    for name, folder in (("--figures", args.figures), ("--readme", Path(args.readme).parent if args.readme else None)):
        if folder is not None and folder_problem(folder):
            p.error(f"argument {name}: {folder_problem(folder)}")
    if args.readme and not Path(args.readme).is_file():
        p.error(f"argument --readme: {args.readme} is not a file")
    all_runs = list_runs(args.runs)
    n_complete = sum(r.complete for r in all_runs)
    if not n_complete:
        what = (f"{len(all_runs)} run record(s) in {args.runs}/, none complete" if all_runs
                else f"no run records in {args.runs}/")
        print(f"tokenmix report: {what}; nothing written. Train a run first, e.g. `make run` or "
              f"`python -m tokenmix train --out_dir {args.runs}`.")
        return 0
    paths = write_report(args.runs, args.figures)
    occlusion = write_tokenmix_occlusion(args.runs, args.figures)
    if not occlusion:
        print(f"tokenmix report: no complete fashion_mnist runs of {' and '.join(OCCLUSION_METHODS)} with one "
              "model (and checkpoints); occlusion figure skipped")
    paths += occlusion
    fidelity = write_label_fidelity(args.runs, args.figures, data_dir=args.data_dir)
    if not fidelity:
        print("tokenmix report: no complete fashion_mnist vit_cpu run with a checkpoint; label-fidelity benchmark skipped")
    paths += fidelity
    paths += write_study_figures(args.runs, args.figures, args.data_dir)
    if args.regime:
        regime = write_regime_report(args.regime, args.figures)
        if not regime:
            print(f"tokenmix report: no complete runs in {args.regime}/; regime pilot skipped")
        paths += regime
    if args.readme and fill_readme(args.readme, args.figures, args.runs) and Path(args.readme) not in paths:
        paths.append(Path(args.readme))
    skipped = len(all_runs) - n_complete
    print(f"tokenmix report: {n_complete} complete run(s)"
          + (f" ({skipped} unfinished or failed skipped)" if skipped else "")
          + "; outputs (a file whose content did not change is left untouched): " + ", ".join(str(p) for p in paths))
    return 0

__all__ = ["OUTPUTS", "README_BLOCKS", "README_END", "README_START", "ablation_table", "fill_readme", "find_root", "main",
           "markdown_table", "mixed_targets_table", "paired_table", "plot_curves", "provenance", "results_display", "results_table",
           "show_attention", "show_images", "show_mixed_batch", "summary_table", "update_readme", "write_report"]
