"""Tables and figures from run records (pure functions of ``runs/<run_id>/`` files).

``python -m tokenmix report --runs runs --figures figures`` (``make figures``) calls :func:`main`,
which writes ``training_curves.{png,svg}``, ``results.md`` and ``results.csv`` from the complete
runs, and ``tokenmix_occlusion.{png,svg,csv}`` (TokenMix's Figure 5) when there are complete
Fashion-MNIST runs of CutMix and TokenMix (:func:`~tokenmix.report.tokenmix.write_tokenmix_occlusion`).
The notebooks show the same functions' figures.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..runs import list_runs
from .figures import (figure_bytes, plot_curves, run_label, save_figure, show_attention, show_images,
                      show_mixed_batch, token_map_to_pixels, unnormalize, write_if_changed)
from .tables import (RESULT_COLUMNS, markdown_table, mixed_targets_table, results_display, results_markdown,
                     results_table, summary_table)

#: files written by :func:`main` into the figures folder
OUTPUTS: tuple[str, ...] = ("training_curves.png", "training_curves.svg", "results.md", "results.csv")


def write_report(runs_dir: str | Path, figures_dir: str | Path) -> list[Path]:
    """Write the report files for the complete runs under ``runs_dir``; returns the paths
    (empty, writing nothing, when there is no complete run). Same records -> same bytes."""
    import matplotlib.pyplot as plt

    runs = [r for r in list_runs(runs_dir) if r.complete]
    if not runs:
        return []
    out = Path(figures_dir)
    fig = plot_curves(runs)
    try:
        paths = save_figure(fig, out / "training_curves")
    finally:
        plt.close(fig)
    df = results_table(runs)
    write_if_changed(out / "results.csv", df.to_csv(index=False, float_format="%.4f", lineterminator="\n").encode())
    write_if_changed(out / "results.md", results_markdown(df).encode())
    return paths + [out / "results.md", out / "results.csv"]


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme: str | Path, markdown: str) -> bool:
    """Replace the text between the ``<!-- results:start -->`` / ``<!-- results:end -->`` markers
    of ``readme`` with ``markdown``; returns True when the file changed.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    path = Path(readme)
    text = path.read_text()
    i, j = text.find(README_START), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"{path} has no '{README_START}' ... '{README_END}' block to fill")
    new = text[:i + len(README_START)] + "\n" + markdown.strip() + "\n" + text[j:]
    return write_if_changed(path, new.encode())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokenmix report [--runs DIR] [--figures DIR]``; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tokenmix report",
                                description="Figures and results tables from the run records.")
    p.add_argument("--runs", default="runs", metavar="DIR", help="folder of run records (default: runs)")
    p.add_argument("--figures", default="figures", metavar="DIR", help="output folder (default: figures)")
    p.add_argument("--readme", default=None, metavar="FILE",
                   help="also paste the results table between the results markers of FILE (e.g. README.md)")
    args = p.parse_args(None if argv is None else list(argv))
    all_runs = list_runs(args.runs)
    n_complete = sum(r.complete for r in all_runs)
    if not n_complete:
        what = (f"{len(all_runs)} run record(s) in {args.runs}/, none complete" if all_runs
                else f"no run records in {args.runs}/")
        print(f"tokenmix report: {what}; nothing written. Train a run first, e.g. `make run` or "
              f"`python -m tokenmix train --out_dir {args.runs}`.")
        return 0
    paths = write_report(args.runs, args.figures)
    from .tokenmix import OCCLUSION_METHODS, write_tokenmix_occlusion
    occlusion = write_tokenmix_occlusion(args.runs, args.figures)
    if not occlusion:
        print(f"tokenmix report: no complete fashion_mnist runs of {' and '.join(OCCLUSION_METHODS)} with one "
              "model (and checkpoints); occlusion figure skipped")
    paths += occlusion
    if args.readme:
        md = (Path(args.figures) / "results.md").read_text()
        md = md.split("\n", 1)[1].lstrip("\n") if md.startswith("# ") else md  # drop the file's own title
        if update_readme(args.readme, md):
            paths.append(Path(args.readme))
    skipped = len(all_runs) - n_complete
    print(f"tokenmix report: {n_complete} complete run(s)"
          + (f" ({skipped} unfinished or failed skipped)" if skipped else "") + "; wrote "
          + ", ".join(str(p) for p in paths))
    return 0


__all__ = ["OUTPUTS", "RESULT_COLUMNS", "figure_bytes", "main", "markdown_table", "mixed_targets_table",
           "plot_curves", "results_display", "results_markdown", "results_table", "run_label", "save_figure",
           "show_attention", "show_images", "show_mixed_batch", "summary_table", "token_map_to_pixels",
           "unnormalize", "update_readme", "write_if_changed", "write_report"]

# method figures: TransMix (notebooks/01_transmix), TokenMix (notebooks/02_tokenmix), TokenMixup
# (notebooks/03_tokenmixup), SMMix (notebooks/04_smmix) and TL-Align (notebooks/05_tl_align)
from .smmix import mixed_topk_accuracy, plot_loss_terms, plot_smmix_vs_cutmix, short_run  # noqa: E402
from .tlalign import plot_layerwise_ratios, plot_token_presence, show_label_alignment  # noqa: E402
from .tokenmix import (OCCLUSION_OUTPUTS, alignment_views, find_occlusion_runs, find_root,  # noqa: E402
                       mask_count_statistics, mask_count_table, mask_examples, occlusion_curves,
                       occlusion_runs, occlusion_table, occlusion_test_set, open_teacher_maps, plot_count_statistics,
                       plot_masks, plot_occlusion, plot_teacher_targets, sample_mask_counts, show_map_alignment,
                       teacher_mix, write_tokenmix_occlusion)
from .tokenmixup import (CurriculumRun, HTMExample, curriculum, htm_example, latency_table,  # noqa: E402
                         mask_variant_table, plot_curriculum, plot_htm_example, plot_saliency_comparison,
                         stack_dataset)
from .transmix import plot_transmix_lambdas, show_token_masks, show_transmix_samples, transmix_ratios_table  # noqa: E402

__all__ += ["plot_layerwise_ratios", "plot_token_presence", "plot_transmix_lambdas", "show_label_alignment",
            "show_token_masks", "show_transmix_samples", "transmix_ratios_table"]
__all__ += ["OCCLUSION_OUTPUTS", "alignment_views", "find_occlusion_runs", "find_root",             "mask_count_statistics", "mask_count_table", "mask_examples", "occlusion_curves", "occlusion_runs",
            "occlusion_table", "occlusion_test_set", "open_teacher_maps", "plot_count_statistics", "plot_masks",
            "plot_occlusion", "plot_teacher_targets", "sample_mask_counts", "show_map_alignment", "teacher_mix",
            "write_tokenmix_occlusion"]
__all__ += ["CurriculumRun", "HTMExample", "curriculum", "htm_example", "latency_table", "mask_variant_table",
            "plot_curriculum", "plot_htm_example", "plot_saliency_comparison", "stack_dataset"]
__all__ += ["mixed_topk_accuracy", "plot_loss_terms", "plot_smmix_vs_cutmix", "short_run"]
