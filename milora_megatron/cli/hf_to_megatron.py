"""Convert a Hugging Face model folder (Llama, Qwen2/2.5, Qwen3, Mistral, Gemma 3, Qwen3-MoE, Mixtral) or Hub id into a milora-megatron base checkpoint.

Streams one tensor / one layer at a time (peak memory near one layer), writes atomically
(HF_DIR -> CKPT_DIR.partial -> CKPT_DIR), and records the HF config, the tokenizer files and
the checksum of every source shard. The checkpoint stores megatron's TP-invariant layout:
it loads at any TP/PP/EP (experts are stored one tensor set per global expert); --tp/--pp/--ep
are validated here and recorded as the default.
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True,
                   help="HF model folder on local disk (config.json, model.safetensors or sharded *.safetensors "
                        "with model.safetensors.index.json, tokenizer files), or a Hugging Face Hub id such as "
                        "meta-llama/Meta-Llama-3-8B, fetched through huggingface_hub's cache (its login, "
                        "HF_HUB_OFFLINE, HF_HOME); only weights, config and tokenizer files are fetched")
    p.add_argument("--revision", default=None,
                   help="with a Hub id: branch, tag or commit (default main); the resolved commit is recorded in "
                        "the checkpoint's manifest")
    p.add_argument("--out", required=True, help="checkpoint folder to create (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size to validate against (must divide heads, KV heads and FFN size; "
                        "the vocabulary is padded to a multiple of 128 x TP when the model is built)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate against (must divide the layers)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size to validate against (a mixture-of-experts model: must divide the experts; "
                        "1 for a dense model)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="store weights in this dtype (default: keep each tensor's source dtype, bit-exact)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from milora_megatron.convert.importer import convert_hf_to_megatron
    from milora_megatron.errors import exit_with

    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--ep", args.ep)):
        if value < 1:
            p.error(f"{flag} must be >= 1")
    try:
        out = convert_hf_to_megatron(args.hf_dir, args.out, args.tp, args.pp, args.dtype, args.overwrite,
                                     progress=not args.quiet, revision=args.revision, ep=args.ep)
    except Exception as exc:  # the user's errors are one line; a bug keeps its traceback
        return exit_with(exc, "hf_to_megatron")
    print(f"base checkpoint written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
