"""Draw one or more training runs into one PNG: training loss, validation and forgetting
loss, learning rate and tokens/s over the steps, read from each run folder's metrics.jsonl.

Example (MiLoRA against LoRA on the same data):
  milora-plot-run runs/milora runs/lora --out compare.png
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (output.dir of the trainer)")
    p.add_argument("--out", default="run.png", help="PNG to write (default run.png)")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run (default: folder, method, rank, lr)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        p.error(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    from milora_megatron.analysis.run_curves import plot_runs
    from milora_megatron.errors import exit_with

    try:
        out = plot_runs(args.runs, args.out, args.labels)
    except Exception as exc:  # the user's errors are one line; a bug keeps its traceback
        return exit_with(exc, "plot_run")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
