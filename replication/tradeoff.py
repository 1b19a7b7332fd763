"""Accuracy against forgetting across learning rates: one learning rate cannot tell "learns
less" from "forgets less" (a method that moves less does both), so each method is swept over
learning rates and compared on its Pareto front, at the accuracies MiLoRA reaches.

Conventions: a point is one (method, lr scale) with its seeds; its spread is the sample std
over them, and not measured (NaN, printed as "1 seed") for a point with one seed: never 0.
A method's front is its points that no other point of the same method beats on both
accuracy (higher) and forgetting KL (lower), ordered by accuracy, so along it both rise.
Matched accuracy interpolates forgetting linearly in accuracy between the two front points
that bracket it, and the spread the same way. Claims are computed here, never written by hand.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .report import display, flatten


@dataclass
class Point:
    method: str
    scale: float
    lr: float
    accuracy: list[float] = field(default_factory=list)  # per seed, %
    forgetting: list[float] = field(default_factory=list)  # forgetting KL per seed
    seeds: list[int] = field(default_factory=list)

    @staticmethod
    def _mean_std(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan

    @property
    def acc(self) -> tuple[float, float]:
        return self._mean_std(self.accuracy)

    @property
    def kl(self) -> tuple[float, float]:
        return self._mean_std(self.forgetting)


def points(results: list[dict]) -> dict[str, list[Point]]:
    """method -> its points ordered by lr scale, from fine-tuning results (each with
    "method", "seed", "lr_scale", "lr")."""
    by_key: dict[tuple[str, float], Point] = {}
    for r in results:
        p = by_key.setdefault((r["method"], r["lr_scale"]), Point(r["method"], r["lr_scale"], r["lr"]))
        f = flatten(r)
        p.accuracy.append(f["accuracy"])
        p.forgetting.append(f["forgetting_kl"])
        p.seeds.append(r["seed"])
    out: dict[str, list[Point]] = {}
    for (method, _), p in sorted(by_key.items(), key=lambda kv: kv[0][1]):
        out.setdefault(method, []).append(p)
    return out


def front(pts: list[Point]) -> list[Point]:
    """The Pareto front (higher accuracy, lower forgetting) ordered by accuracy."""
    def beaten(p: Point) -> bool:
        return any(q.acc[0] >= p.acc[0] and q.kl[0] <= p.kl[0] and (q.acc[0], q.kl[0]) != (p.acc[0], p.kl[0])
                   for q in pts)
    return sorted((p for p in pts if not beaten(p)), key=lambda p: p.acc[0])


def at_accuracy(pts: list[Point], target: float) -> tuple[float, float, list[Point]] | None:
    """Forgetting KL (mean, spread) on the method's front at ``target`` accuracy and the
    front points used; None outside the front's accuracy range."""
    f = front(pts)
    for p in f:
        if abs(p.acc[0] - target) < 1e-9:
            return p.kl[0], p.kl[1], [p]
    for lo, hi in zip(f, f[1:]):
        if lo.acc[0] < target < hi.acc[0]:
            t = (target - lo.acc[0]) / (hi.acc[0] - lo.acc[0])
            return ((1 - t) * lo.kl[0] + t * hi.kl[0], (1 - t) * lo.kl[1] + t * hi.kl[1], [lo, hi])
    return None


def levels(by_method: dict[str, list[Point]], reference: str = "milora") -> list[Point]:
    """The accuracies to compare at: the reference method's own front points (measured,
    so the reference is never interpolated)."""
    return front(by_method.get(reference, []))


def relied_on(by_method: dict[str, list[Point]], reference: str = "milora") -> set[tuple[str, float]]:
    """(method, scale) of every point the matched-accuracy table reads: they get more seeds."""
    used = set()
    for level in levels(by_method, reference):
        used.add((reference, level.scale))
        for method, pts in by_method.items():
            hit = None if method == reference else at_accuracy(pts, level.acc[0])
            used.update((method, p.scale) for p in (hit[2] if hit else []))
    return used


def _pm(mean: float, std: float, fmt: str) -> str:
    return f"{fmt.format(mean)} (1 seed)" if math.isnan(std) else f"{fmt.format(mean)} ± {fmt.format(std)}"


def _against(diff: float, spread: float, fmt: str) -> str:
    """How a difference compares with the summed spread (unknown when a point has one seed)."""
    if math.isnan(spread):
        return f"difference {fmt.format(abs(diff))}; spread not measured: a point with one seed"
    return (f"difference {fmt.format(abs(diff))}, {'larger' if abs(diff) > spread else 'not larger'} than the "
            f"summed spread {fmt.format(spread)}")


def matched_table(by_method: dict[str, list[Point]], reference: str = "milora") -> str:
    methods = list(by_method)
    head = "| accuracy (MiLoRA point) | " + " | ".join(f"{display(m)} forgetting KL" for m in methods) + " |"
    lines = [head, "|---" * (len(methods) + 1) + "|"]
    for level in levels(by_method, reference):
        cells = []
        for m in methods:
            hit = at_accuracy(by_method[m], level.acc[0])
            if hit is None:
                reach = front(by_method[m])
                cells.append(f"not reached (front {reach[0].acc[0]:.1f}-{reach[-1].acc[0]:.1f}%)" if reach else "-")
            elif len(hit[2]) == 1:
                cells.append(_pm(hit[0], hit[1], "{:.3f}"))
            elif math.isnan(hit[1]):
                cells.append(f"{hit[0]:.3f} (interp.; spread not measured)")
            else:
                cells.append(_pm(hit[0], hit[1], "{:.3f}") + " (interp.)")
        (acc, sd), n = level.acc, len(level.seeds)
        label = f"{acc:.1f}%" if math.isnan(sd) else f"{acc:.1f} ± {sd:.1f}%"
        lines.append(f"| {label} (lr x{level.scale:g}, {n} seed{'s' if n > 1 else ''}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_table(by_method: dict[str, list[Point]]) -> str:
    lines = ["| method | best exact match (%) | at lr | its forgetting KL | seeds |", "|---|---|---|---|---|"]
    for m, pts in by_method.items():
        best = max(pts, key=lambda p: p.acc[0])
        lines.append(f"| {display(m)} | {_pm(*best.acc, '{:.1f}')} | {best.lr:g} (x{best.scale:g}) | "
                     f"{_pm(*best.kl, '{:.3f}')} | {len(best.seeds)} |")
    return "\n".join(lines)


def sweep_table(by_method: dict[str, list[Point]]) -> str:
    """Every point: the data behind the plot."""
    lines = ["| method | lr (x paper setting) | seeds | exact match (%) | forgetting KL | on front |", "|---|---|---|---|---|---|"]
    for m, pts in by_method.items():
        on = {p.scale for p in front(pts)}
        for p in pts:
            lines.append(f"| {display(m)} | {p.lr:g} (x{p.scale:g}) | {','.join(map(str, p.seeds))} | "
                         f"{_pm(*p.acc, '{:.1f}')} | {_pm(*p.kl, '{:.3f}')} | {'yes' if p.scale in on else ''} |")
    return "\n".join(lines)


def claims(by_method: dict[str, list[Point]], reference: str = "milora") -> list[str]:
    """At each of the reference's accuracies, does it forget less than each other method, and
    by more than the summed spread? And is its best accuracy at least each other's?"""
    out = []
    if reference not in by_method:
        return out
    name = display(reference)
    for level in levels(by_method, reference):
        (acc, _), (kl, kl_sd) = level.acc, level.kl
        for m, pts in by_method.items():
            if m == reference:
                continue
            hit = at_accuracy(pts, acc)
            if hit is None:
                out.append(f"At {acc:.1f}% accuracy (MiLoRA lr x{level.scale:g}), {display(m)}'s front does not reach it: no comparison")
                continue
            diff, spread = hit[0] - kl, hit[1] + kl_sd
            out.append(f"At {acc:.1f}% accuracy (MiLoRA lr x{level.scale:g}), {name} forgets less than {display(m)}: "
                       f"{'yes' if diff > 0 else 'no'} ({kl:.3f} vs {hit[0]:.3f}; {_against(diff, spread, '{:.3f}')})")
    mine = max(by_method[reference], key=lambda p: p.acc[0])
    for m, pts in by_method.items():
        if m == reference:
            continue
        theirs = max(pts, key=lambda p: p.acc[0])
        diff, spread = mine.acc[0] - theirs.acc[0], mine.acc[1] + theirs.acc[1]
        out.append(f"{name}'s best accuracy is at least {display(m)}'s: {'yes' if diff >= 0 else 'no'} "
                   f"({mine.acc[0]:.1f}% vs {theirs.acc[0]:.1f}%; {_against(diff, spread, '{:.1f}')})")
    return out


def _or_zero(spread: float) -> float:
    return 0.0 if math.isnan(spread) else spread


def plot(by_method: dict[str, list[Point]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (m, pts) in enumerate(by_method.items()):
        color = f"C{i}"
        for p in pts:
            ax.scatter(p.forgetting, p.accuracy, color=color, s=8, alpha=0.4)
            ax.errorbar(p.kl[0], p.acc[0], xerr=_or_zero(p.kl[1]), yerr=_or_zero(p.acc[1]), color=color, fmt="o",
                        capsize=3, ms=5)
            ax.annotate(f"x{p.scale:g}", (p.kl[0], p.acc[0]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        f = front(pts)
        ax.plot([p.kl[0] for p in f], [p.acc[0] for p in f], color=color, label=f"{display(m)} (front)")
    ax.set_xlabel("forgetting KL on held-out text (nats/token, lower is better)")
    ax.set_ylabel("task exact match (%)")
    ax.set_title("Accuracy against forgetting across learning rates\n(mean ± std over seeds; dots: single seeds; labels: lr scale)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
