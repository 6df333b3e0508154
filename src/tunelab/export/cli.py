"""`tunelab merge` (fold an adapter into its base) and `tunelab export` (GGUF file or merged HF folder)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model and save a standalone model",
        description="Fold a LoRA / rsLoRA / DoRA adapter into the base weights and write sharded safetensors "
                    "with the tokenizer, chat template and every other file of the base. The merged logits are "
                    "checked against base + adapter before anything is written.",
        epilog="example: tunelab merge --adapter runs/hotel --out merged/hotel",
    )
    p.add_argument("--model", help="the base model: alias, folder or hub id in the local cache "
                                    "(default: the base the adapter records in adapter_config.json)")
    p.add_argument("--adapter", required=True, help="the adapter folder (adapter_config.json + weights)")
    p.add_argument("--out", required=True, help="where the merged model goes (replaced atomically)")
    p.add_argument("--dtype", default="auto", help="auto (the base's own), bf16, fp16 or fp32")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--force-base", action="store_true",
                   help="merge even though the adapter records a differently named base (shapes are still checked)")
    p.add_argument("--template", help="chat template to ship (default: the one the adapter was trained with); "
                                      "refused where it prompts differently from the trained one")
    p.add_argument("--force-template", action="store_true", help="ship --template even though it prompts differently")
    p.set_defaults(func=run)
    register_export(subparsers)


def register_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained model: a GGUF file (llama.cpp, Ollama, LM Studio) or a merged HF folder",
        description="--format gguf writes one .gguf file (Llama and Qwen2 architectures) with the tokenizer and the "
                    "trained chat template, loaded back with transformers' GGUF loader and checked before it is "
                    "kept. --format hf writes the merged folder (as `tunelab merge`).",
        epilog="examples:\n  tunelab export --model smollm2-135m-instruct --adapter runs/hotel --format gguf "
               "--outtype q8_0 --out exports/hotel-q8_0.gguf\n"
               "  tunelab export --model merged/hotel --format gguf --outtype bf16 --out exports/hotel-bf16.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model (with --adapter) or a merged / full fine-tuned folder")
    p.add_argument("--adapter", help="a LoRA adapter folder, merged into the model first")
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf")
    p.add_argument("--out", required=True, help="the .gguf file (gguf) or folder (hf) to write")
    p.add_argument("--outtype", default="q8_0", help="gguf: f32, f16, bf16 or q8_0 (default)")
    p.add_argument("--dtype", default="auto", help="hf: auto (the base's own), bf16, fp16 or fp32")
    p.add_argument("--no-verify", action="store_true",
                   help="gguf: skip loading the file back (it needs memory for an fp32 copy of the model)")
    p.add_argument("--force-base", action="store_true", help="as for `tunelab merge`")
    p.add_argument("--template", help="hf: chat template to ship (default: the trained one; see `tunelab merge`)")
    p.add_argument("--force-template", action="store_true")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from tunelab.errors import TunelabError

    if args.format == "hf":
        if not args.adapter:
            raise TunelabError("--format hf merges an adapter, but none was given", where="command line",
                               fix="add --adapter runs/your_run (a full fine-tune's folder is already an HF model)")
        return run(argparse_namespace(args, max_shard_size="2GB"))
    if args.template:
        raise TunelabError("--template applies to --format hf", where="--template",
                           fix="export --format hf --template ..., then export that folder as gguf")
    from tunelab.export.gguf import export_gguf

    report = export_gguf(args.model, args.out, adapter=args.adapter, outtype=args.outtype,
                         verify=not args.no_verify, force_base=args.force_base)
    print(report.summary())
    return 0


def argparse_namespace(args, **extra):
    return type(args)(**{**vars(args), **extra})


def run(args) -> int:
    from tunelab.export.merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, force_base=args.force_base,
                           template=args.template, force_template=args.force_template)
    print(report.summary())
    return 0
