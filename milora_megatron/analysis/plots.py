"""PNG figures of a spectrum report (``deltas.spectrum_report``), drawn with matplotlib's
Agg backend so they work on headless machines: subspace-similarity heatmaps (layer x
target), amplification per layer, and W's singular values with the init region marked."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .outputs import output_error  # noqa: E402

SIMILARITIES = (("left_bottom", "left sing. vectors vs W bottom-r"), ("left_top", "left sing. vectors vs W top-r"),
                ("right_bottom", "right sing. vectors vs W bottom-r"), ("right_top", "right sing. vectors vs W top-r"))


def _grid(report: dict, value) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, targets, array[layer, target]) of ``value(entry)``; NaN where absent."""
    entries = report["entries"]
    layers = sorted({e["layer"] for e in entries})
    targets = [t for t in report["targets"] if any(e["target"] == t for e in entries)]
    grid = np.full((len(layers), len(targets)), np.nan)
    for e in entries:
        v = value(e)
        if v is not None:
            grid[layers.index(e["layer"]), targets.index(e["target"])] = v
    return layers, targets, grid


def _title(report: dict) -> str:
    return f"{report.get('method') or 'unknown method'}, r = {report['rank']}"


def similarity_heatmaps(report: dict, path: str) -> str:
    """2 x 2 heatmaps: dW's top-r left/right singular vectors vs W's bottom-r and top-r."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 8), squeeze=False)
    for ax, (key, label) in zip(axes.flat, SIMILARITIES):
        layers, targets, grid = _grid(report, lambda e, k=key: (e.get("similarity") or {}).get(k))
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=10)
        if grid.size <= 64:  # small grids: print the values
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"normalised subspace similarity of dW to W ({_title(report)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def amplification_curves(report: dict, path: str) -> str:
    """Amplification factor ||dW||_F / ||U^T W V||_F per layer, one line per target."""
    layers, targets, grid = _grid(report, lambda e: e.get("amplification"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, target in enumerate(targets):
        ax.plot(layers, grid[:, j], marker="o", label=target)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("amplification factor")
    if np.nanmin(grid, initial=np.inf) > 0:
        ax.set_yscale("log")
    ax.set_title(f"amplification factor ({_title(report)})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def w_spectra(report: dict, path: str) -> str:
    """W's singular values per target (one curve per layer), the r values the method's initial
    factors came from shaded; for LoRA / unknown both candidate regions are shaded."""
    entries = report["entries"]
    targets = [t for t in report["targets"] if any(e["target"] == t for e in entries)]
    r, which = report["rank"], report.get("init_subspace")
    cols = min(4, max(1, len(targets)))
    rows = -(-len(targets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    layers = sorted({e["layer"] for e in entries})
    for ax, target in zip(axes.flat, targets):
        count = 0
        for e in entries:
            if e["target"] != target:
                continue
            s = np.asarray(e["w_spectrum"])
            count = len(s)
            shade = layers.index(e["layer"]) / max(1, len(layers) - 1)
            ax.plot(np.arange(1, count + 1), s, color=cmap(shade), lw=1)
        regions = {"top": (1, r), "bottom": (count - r + 1, count)}
        for name, color in (("top", "tab:red"), ("bottom", "tab:blue")):
            if which in (None, name):
                lo, hi = regions[name]
                label = f"{name}-r" + (" (init)" if which == name else "")
                ax.axvspan(lo - 0.5, hi + 0.5, color=color, alpha=0.2, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("index")
        ax.set_ylabel("singular value of W")
        ax.set_title(target, fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(targets):]:
        ax.axis("off")
    fig.suptitle(f"W's singular values, layers {layers[0]}..{layers[-1]} dark -> light ({_title(report)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_report(report: dict, plot_dir: str) -> list[str]:
    """All three figures into ``plot_dir``; returns their paths."""
    try:
        os.makedirs(plot_dir, exist_ok=True)
        if not report["entries"]:
            return []
        return [similarity_heatmaps(report, os.path.join(plot_dir, "similarity_heatmaps.png")),
                amplification_curves(report, os.path.join(plot_dir, "amplification.png")),
                w_spectra(report, os.path.join(plot_dir, "w_spectrum.png"))]
    except OSError as exc:  # a full disk, a --plot-dir that is a file or not writable
        plt.close("all")
        raise output_error(exc, plot_dir) from exc
