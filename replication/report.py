"""Per-method mean and spread over seeds: a markdown table, a plot, and the paper's ordering
checked against the numbers (not asserted: reported)."""

from __future__ import annotations

import statistics

from milora_megatron.adapters.variants import available, get_variant


def display(method: str) -> str:
    return get_variant(method).display_name

# (key in a run's result, column title, format, better)
COLUMNS = [
    ("accuracy", "task exact match (%)", "{:.1f}", "high"),
    ("task_loss", "task loss", "{:.3f}", "low"),
    ("forgetting_loss", "forgetting loss", "{:.4f}", "low"),
    ("forgetting_kl", "forgetting KL (loss - base entropy)", "{:.4f}", "low"),
    ("heldout_ppl", "held-out ppl (base {base_ppl:.2f})", "{:.2f}", "low"),
    ("amplification", "amplification", "{:.2f}", None),
    ("sim_bottom", "sim. to W bottom-r", "{:.3f}", None),
    ("sim_top", "sim. to W top-r", "{:.3f}", None),
]


def flatten(result: dict) -> dict:
    """The numbers the table shows, from one run's evaluation + spectrum report."""
    gen, task, spec = result["eval"]["general"], result["eval"]["task"]["finetuned"], result["spectrum"]["all"]
    return {
        "accuracy": 100.0 * task["exact_match"], "task_loss": task["task_loss"],
        "forgetting_loss": gen["forgetting_loss"], "forgetting_kl": gen["forgetting_kl"],
        "heldout_ppl": gen["finetuned_ppl"], "amplification": spec["amplification"],
        "sim_bottom": (spec["left_bottom"] + spec["right_bottom"]) / 2,
        "sim_top": (spec["left_top"] + spec["right_top"]) / 2,
    }


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, list[float]]]]:
    """method -> key -> (mean, sample std, values)."""
    out = {}
    for method, results in runs.items():
        flats = [flatten(r) for r in results]
        out[method] = {}
        for key, *_ in COLUMNS:
            values = [f[key] for f in flats]
            out[method][key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values)
    return out


def markdown_table(stats: dict, base: dict) -> str:
    head = [c[1].format(**base) for c in COLUMNS]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method, s in stats.items():
        cells = [f"{c[2].format(s[c[0]][0])} ± {c[2].format(s[c[0]][1])}" for c in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering(stats: dict) -> list[str]:
    """The paper's claims, each checked on the means and against the seed spread."""
    out = []
    if "milora" not in stats:
        return out
    m = stats["milora"]
    for other in available():
        if other == "milora" or other not in stats:
            continue
        o = stats[other]
        for key, word, better in (("forgetting_kl", "forgets less (forgetting KL)", "low"),
                                  ("accuracy", "is at least as accurate as", "high")):
            (mm, ms, _), (om, os_, _) = m[key], o[key]
            holds = mm <= om if better == "low" else mm >= om
            margin = abs(mm - om)
            clear = margin > ms + os_
            out.append(f"MiLoRA {word}{'' if word.endswith(' as') else ' than'} {display(other)}: "
                       f"{'yes' if holds else 'no'} ({mm:.4g} vs {om:.4g}; difference {margin:.3g}, "
                       f"{'larger' if clear else 'not larger'} than the summed seed std {ms + os_:.3g})")
    return out


def plot(stats: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "task exact match (%)"), ("forgetting_kl", "forgetting KL (nats/token)"),
              ("sim_bottom", "similarity of dW to W's bottom-r"), ("sim_top", "similarity of dW to W's top-r")]
    methods = list(stats)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for i, method in enumerate(methods):
            mean, std, values = stats[method][key]
            ax.bar(i, mean, yerr=std, color=f"C{i}", alpha=0.7, capsize=4)
            ax.scatter([i] * len(values), values, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(title, fontsize=10)
    fig.suptitle("CPU replication: mean ± std over seeds (dots: single seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
