"""PNG figures for reports: time per layer type (original vs rebirth) and side-by-side
latency / memory / instruction bars. matplotlib with the Agg backend (no display needed);
each figure is written to a temporary name and renamed, so a failure leaves no half file."""

from __future__ import annotations

import os
from pathlib import Path

from .profile import LAYER_TYPES

COLORS = {"convolution": "#4c72b0", "fully connected": "#8172b2", "pooling": "#dd8452",
          "LRN": "#c44e52", "batch norm": "#937860", "concat": "#55a868", "other": "#8c8c8c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        fig.clf()
        _pyplot().close(fig)
    return path


def plot_layer_time(profiles: dict, path, title: str) -> Path:
    """Stacked bars, one per variant ({name: profile.time_by_layer_type result}): ms per
    layer type, each segment labelled with its share of that variant's time."""
    plt = _pyplot()
    names = list(profiles)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.9 * len(names)))
    for row, name in enumerate(names):
        left, total = 0.0, profiles[name]["total_ms"] or 1.0
        for kind in LAYER_TYPES:
            ms = profiles[name].get(kind, 0.0)
            if ms <= 0:
                continue
            ax.barh(row, ms, left=left, color=COLORS[kind],
                    label=kind if kind not in ax.get_legend_handles_labels()[1] else None)
            if ms / total >= 0.04:
                ax.text(left + ms / 2, row, f"{100 * ms / total:.0f}%", ha="center",
                        va="center", fontsize=8, color="white")
            left += ms
        ax.text(left, row, f"  {left:.1f} ms", va="center", fontsize=9)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per inference (kernel time, median of runs)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(p["total_ms"] for p in profiles.values()) * 1.18)
    ax.legend(ncol=len(LAYER_TYPES), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22),
              frameon=False, handlelength=1)
    return _save(fig, path)


def plot_side_by_side(metrics: list, path, title: str) -> Path:
    """One panel per metric: [(label, {variant: value}, "x ratio" text or None), ...]."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2))
    axes = axes if len(metrics) > 1 else [axes]
    palette = ["#8c8c8c", "#4c72b0", "#55a868", "#dd8452"]
    for ax, (label, values, note) in zip(axes, metrics):
        names = list(values)
        bars = ax.bar(names, [values[n] for n in names],
                      color=[palette[i % len(palette)] for i in range(len(names))])
        for bar, name in zip(bars, names):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{values[name]:.4g}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(label + (f"\n{note}" if note else ""), fontsize=9)
        ax.set_ylim(0, max(values.values()) * 1.2)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
