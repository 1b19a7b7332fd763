"""Spectrum and subspace analysis of a fine-tune against its ORIGINAL base, per layer and target
(MiLoRA paper section 5.3, after Hu et al. 2021 section 7).

For each adapted weight W (base) and its update dW:
  amplification      ||dW||_F / ||U^T W V||_F, U, V = dW's top-r singular vectors (Hu et al.);
                     amp_proj = ||U^T dW V||_F / ||U^T W V||_F is the ratio the MiLoRA paper's
                     Table 7 prints (equal when rank(dW) <= r; PiSSA/MiLoRA exports reach 2r)
  similarity         phi = ||U1^T U2||_F^2 / r of dW's top-r left (L) / right (R) singular vectors
                     with W's top-r and bottom-r ones, in [0, 1]; chance level is r / dim
  init sigma         W's singular values the method's initial factors came from: MiLoRA and
                     MiCA bottom-r, PiSSA top-r, LoRA none (random A, zero B); the JSON keeps
                     both, W's max/min and its whole spectrum

dW comes from a PEFT LoRA adapter (s B A, analysed through its factors: exact and cheap) or
a merged HF folder (merged - base in float64). Every SVD is a full float64 one; the base is
read one tensor at a time (sharded safetensors fine), so memory stays near one weight.

Outputs: a table on stdout, --out-json, and PNGs in --plot-dir (similarity_heatmaps.png,
amplification.png, w_spectrum.png).

--base is checked against the base our exports record (milora_export.json's base_shards);
an adapter or merged folder that records none (a PEFT adapter trained elsewhere) cannot be
checked: a one-line note says so on stderr and in the JSON ("base_check").

Example:
  tools/analyze/spectrum.py --base hf_llama --adapter peft_adapter --out-json spectrum.json --plot-dir plots
"""

import argparse
import sys

from milora_megatron.adapters.variants import available  # (no megatron)
from milora_megatron.mapping import HF_TARGETS as TARGETS  # (torch only)


def _fmt(x, width=8, digits=3):
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def format_table(report: dict) -> str:
    """One row per (layer, target), then the per-target means."""
    head = (f"{'layer':>5} {'target':<9} {'amp':>8} {'amp_proj':>8} {'L-top':>6} {'L-bot':>6} {'R-top':>6} "
            f"{'R-bot':>6}  init sigma ({report.get('init_subspace') or 'none: top / bottom'})")
    lines = [f"method {report.get('method') or 'unknown'} ({report['method_source']}), rank {report['rank']} "
             f"({report['rank_source']})", head, "-" * len(head)]
    for e in report["entries"]:
        sim = e.get("similarity") or {}
        ws = e["w_sigma"]
        init = ws["init"] if ws["init"] is not None else None
        sig = (f"{init[0]:.3g}..{init[-1]:.3g}" if init is not None
               else f"{ws['top'][0]:.3g}..{ws['top'][-1]:.3g} / {ws['bottom'][0]:.3g}..{ws['bottom'][-1]:.3g}")
        lines.append(f"{e['layer']:>5} {e['target']:<9} {_fmt(e.get('amplification'), 8, 2)} "
                     f"{_fmt(e.get('amplification_projected'), 8, 2)} "
                     + " ".join(_fmt(sim.get(k), 6) for k in ("left_top", "left_bottom", "right_top", "right_bottom"))
                     + f"  {sig}")
    lines.append("-" * len(head))
    for target, m in report["summary"]["by_target"].items():
        lines.append(f"{'mean':>5} {target:<9} {_fmt(m['amplification'], 8, 2)} "
                     f"{_fmt(m['amplification_projected'], 8, 2)} "
                     + " ".join(_fmt(m[k], 6) for k in ("left_top", "left_bottom", "right_top", "right_bottom")))
    if report["unchanged"]:
        lines.append(f"unchanged (dW = 0 or not adapted, skipped): {len(report['unchanged'])} "
                     f"e.g. {', '.join(report['unchanged'][:6])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True,
                   help="ORIGINAL base HF Llama folder (config.json + model.safetensors or sharded *.safetensors "
                        "with model.safetensors.index.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors; "
                                       "our exports add milora_export.json with the method and trained rank)")
    src.add_argument("--merged", help="merged fine-tuned HF folder; dW = merged - base in float64 (needs --rank)")
    p.add_argument("--rank", type=int, default=None,
                   help="r: how many singular vectors of dW and of W to compare (default: the trained rank from "
                        "milora_export.json, else the adapter's r; required with --merged)")
    p.add_argument("--method", choices=available(), default=None,
                   help="the adapter's method, for which of W's singular values its init came from "
                        "(default: from milora_export.json; else unknown and both top-r and bottom-r are shown)")
    p.add_argument("--targets", default=None,
                   help=f"comma-separated projections to analyse, of {','.join(TARGETS)} "
                        "(default: those in the adapter; with --merged all, skipping unchanged ones)")
    p.add_argument("--layers", default=None,
                   help="layers to analyse, e.g. '0,8,16-19' (default: all the adapter touches / all)")
    p.add_argument("--out-json", default=None,
                   help="write the full report here: per entry every metric, dW's top 2r singular values, "
                        "W's top/bottom-r, max, min and whole spectrum, plus per-target/per-layer means")
    p.add_argument("--plot-dir", default=None, help="write the PNG figures into this folder (created if missing)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table (errors still go to stderr)")
    args = p.parse_args(argv)

    from milora_megatron.analysis.deltas import parse_layers, spectrum_report
    from milora_megatron.analysis.outputs import write_json
    from milora_megatron.convert.hf_folder import HFFolder
    from milora_megatron.errors import exit_with

    if args.rank is not None and args.rank < 1:
        p.error("--rank must be >= 1")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    try:
        layers = parse_layers(args.layers, HFFolder(args.base).num_layers()) if args.layers else None
        report = spectrum_report(args.base, adapter_dir=args.adapter, merged_dir=args.merged, rank=args.rank,
                                 method=args.method, targets=targets, layers=layers, progress=not args.quiet)
        if report["base_check"]["note"]:
            print(f"spectrum: note: {report['base_check']['note']}", file=sys.stderr)
        if not args.quiet:
            print(format_table(report))
        if not report["entries"]:
            print("spectrum: warning: no adapted weight with a nonzero update was found", file=sys.stderr)
        if args.out_json:
            write_json(args.out_json, report)
            print(f"report written: {args.out_json}")
        if args.plot_dir:
            from milora_megatron.analysis.plots import plot_report

            for path in plot_report(report, args.plot_dir):
                print(f"plot written: {path}")
    except Exception as exc:  # the user's errors are one line; a bug keeps its traceback
        return exit_with(exc, "spectrum")
    return 0


if __name__ == "__main__":
    sys.exit(main())
