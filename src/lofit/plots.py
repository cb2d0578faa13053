"""A layers x heads heatmap of head-importance scores."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .atomic import replacing  # noqa: E402


def head_heatmap(scores: torch.Tensor, selected: Sequence[tuple[int, int]], path: str | Path, title: str = "") -> None:
    """Write a PNG of ``scores`` (num_layers x num_heads) with ``selected`` heads outlined."""
    num_layers, num_heads = scores.shape
    figure, axes = plt.subplots(figsize=(max(4.0, 0.45 * num_heads + 2), max(3.0, 0.25 * num_layers + 1.5)))
    image = axes.imshow(scores.numpy(), aspect="auto", cmap="viridis", origin="lower")
    for layer, head in selected:
        axes.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(num_heads))
    axes.set_title(title or f"head importance ||A||_2 (red: {len(selected)} selected)")
    figure.colorbar(image, ax=axes, label="score")
    figure.tight_layout()
    with replacing(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")
    plt.close(figure)
