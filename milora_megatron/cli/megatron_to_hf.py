"""Export to Hugging Face format: a merged model (default) or a PEFT LoRA adapter.

--ckpt takes a converted base checkpoint (plain export, bit-identical to the source), an
adapter checkpoint folder, or a training run's output folder (its latest checkpoint, which
records the base it trained on; the base must still be there, unchanged). A base checkpoint
folder that also holds a training run (checkpoints/, run.json) is refused rather than guessed
at: give the step folder (DIR/checkpoints/step_N) for the adapter, or DIR/milora_base.json
for the base alone.

Merged: W + s (B A - B0 A0) for every adapted target, computed in float32 from the original
base weights and cast to the source dtype (or --dtype); sharded safetensors with index,
config.json, generation config and tokenizer files from the source.

--adapter-only: adapter_config.json + adapter_model.safetensors for
PeftModel.from_pretrained(ORIGINAL_BASE, OUT_DIR). PiSSA/MiLoRA are written in PEFT's
rank-2r form (lora_A = [A; A0], lora_B = [B, -B0], r -> 2r, alpha -> 2 alpha); LoRA and
MiCA at rank r. A mixture-of-experts model's adapter: --expert-form fused (default; PEFT on
the original transformers model, whose experts are fused 3-D parameters: target_parameters,
gate and up of an expert one block-diagonal LoRA of gate_up_proj at twice the rank, set in
rank_pattern/alpha_pattern) or per-expert (serving engines such as vLLM: each expert's
gate/up/down under its on-disk name, one rank and alpha for every module).

An error the user can act on (a damaged or diverged checkpoint, --out in the way, a full
disk) is one line on stderr and exit status 2; nothing already on disk is changed.
"""

import argparse
import os
import re
import sys

from milora_megatron.errors import exit_with


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="base checkpoint, adapter checkpoint, or run output folder")
    p.add_argument("--out", required=True, help="folder to create (must not exist unless --overwrite)")
    p.add_argument("--adapter-only", action="store_true", help="write a PEFT LoRA adapter instead of merged weights")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="output dtype (default: each tensor's source dtype; adapters: fp32)")
    p.add_argument("--max-shard-size", type=parse_size, default="1GB",
                   help="largest merged safetensors shard (default 1GB; peak memory is about one shard plus one layer)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip re-checking the BASE checkpoint's file checksums (its sizes are always checked); "
                        "the adapter checkpoint's checksums are always verified (its files are small)")
    p.add_argument("--base", default=None,
                   help="where the run's base checkpoint is now, if it was moved (it must be the same base: "
                        "its content fingerprint is checked)")
    p.add_argument("--expert-form", choices=["fused", "per-expert"], default="fused",
                   help="with --adapter-only on a mixture-of-experts model: fused (default: PEFT on the original "
                        "transformers model, experts as its fused 3-D parameters) | per-expert (serving engines: "
                        "each expert's projections under their on-disk names, one rank and alpha everywhere)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    from milora_megatron.convert.exporter import export_merged, export_peft

    try:
        if args.adapter_only:
            out = export_peft(args.ckpt, args.out, args.dtype, args.overwrite, verify=not args.no_verify,
                              base_path=args.base, expert_form=args.expert_form)
        else:
            out = export_merged(args.ckpt, args.out, args.dtype, args.max_shard_size, args.overwrite,
                                verify=not args.no_verify, progress=not args.quiet, base_path=args.base)
    except Exception as exc:  # the user's errors are one line; a bug keeps its traceback
        return exit_with(exc, "megatron_to_hf", os.path.abspath(args.out))
    print(f"{'PEFT adapter' if args.adapter_only else 'HF model'} written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
