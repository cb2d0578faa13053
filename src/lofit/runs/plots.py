"""Figures: the layers x heads heatmap of head scores, and the experiments' matrices, histograms and curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from lofit.methods.lofit.localization import Localization  # noqa: E402
from lofit.utils.atomic import replacing  # noqa: E402


def head_heatmap(scores: torch.Tensor, selected: Sequence[tuple[int, int]], path: str | Path, title: str = "") -> None:
    """Write a PNG of ``scores`` (num_layers x num_heads) with ``selected`` heads outlined, and beside it
    the sorted scores with the selection's cut, its share of the total and the effective number of heads
    (:class:`lofit.methods.lofit.localization.Localization`): a localized step 1 drops steeply after its top heads."""
    num_layers, num_heads = scores.shape
    width = max(4.0, 0.45 * num_heads + 2)
    figure, (axes, curve) = plt.subplots(
        1, 2, figsize=(width + 4.5, max(3.0, 0.25 * num_layers + 1.5)), gridspec_kw={"width_ratios": [width, 4.5]}
    )
    image = axes.imshow(scores.numpy(), aspect="auto", cmap="viridis", origin="lower")
    for layer, head in selected:
        axes.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(num_heads))
    axes.set_title(title or f"head importance ||A||_2 (red: {len(selected)} selected)")
    figure.colorbar(image, ax=axes, label="score")

    ordered = scores.flatten().abs().sort(descending=True).values
    curve.plot(range(1, len(ordered) + 1), ordered.numpy(), color="black", linewidth=1.2)
    if selected:
        figures = Localization.of(scores, len(selected))
        curve.axvline(len(selected), color="red", linestyle="--", linewidth=1)
        curve.set_title(
            f"top {len(selected)}: {100 * figures.top_share:.0f}% of the score "
            f"(uniform {100 * figures.uniform_share:.0f}%)\neffective heads {figures.effective_heads:.0f} "
            f"of {figures.total}; {figures.label}",
            fontsize=9,
        )
    curve.set_xlabel("heads, by rank")
    curve.set_ylabel("score")
    curve.set_ylim(bottom=0)
    _save(figure, path)


def _save(figure, path: str | Path) -> None:
    figure.tight_layout()
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)


def matrix_plot(
    values: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    columns: Sequence[str],
    path: str | Path,
    title: str,
    row_label: str,
    column_label: str,
    unit: str = "",
) -> None:
    """Write a PNG of a rows x columns matrix, each cell annotated (blank where None)."""
    data = torch.tensor([[float("nan") if v is None else v for v in row] for row in values])
    figure, axes = plt.subplots(figsize=(1.6 * len(columns) + 2.5, 1.1 * len(rows) + 1.8))
    limit = float(data.nan_to_num(0).abs().max()) or 1.0
    image = axes.imshow(data.numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value is not None:
                dark = abs(value) > 0.6 * limit  # the colour map's ends are dark: white text there
                axes.text(
                    j,
                    i,
                    f"{value:+.1f}{unit}",
                    ha="center",
                    va="center",
                    fontsize=10,
                    color="white" if dark else "black",
                )
    axes.set_xticks(range(len(columns)), columns)
    axes.set_yticks(range(len(rows)), rows)
    axes.set_xlabel(column_label)
    axes.set_ylabel(row_label)
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    _save(figure, path)


def layer_histograms(
    counts: dict[str, Sequence[int]], path: str | Path, title: str = "selected heads per layer"
) -> None:
    """Write a PNG with one bar chart per entry of ``counts`` (name -> heads per layer)."""
    figure, axes = plt.subplots(len(counts), 1, figsize=(7, 2.2 * len(counts) + 0.6), sharex=True, squeeze=False)
    for ax, (name, per_layer) in zip(axes[:, 0], counts.items()):
        ax.bar(range(len(per_layer)), per_layer, color="tab:blue")
        ax.set_ylabel("heads")
        ax.set_title(f"{name} ({sum(per_layer)} heads)", fontsize=10)
    axes[-1, 0].set_xlabel("layer")
    figure.suptitle(title)
    _save(figure, path)


def curves(
    panels: dict[str, dict[str, list[tuple[float, float, float]]]],
    path: str | Path,
    x_label: str,
    y_label: str,
    log_x: bool = False,
) -> None:
    """Write a PNG with one panel per entry of ``panels`` (name -> line label -> points
    (x, mean, std)), each line with standard-deviation error bars; with ``log_x`` the x axis
    is logarithmic and ticked at the measured x values."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, points in lines.items():
            xs, means, stds = zip(*sorted(points))
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
        if log_x:
            # Label the measured x values themselves (10, 30, 100; 1, 3, 5 %), not powers of ten.
            ax.set_xscale("log")
            ticks = sorted({x for points in lines.values() for x, _, _ in points})
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(name)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.legend(fontsize=8)
    _save(figure, path)
