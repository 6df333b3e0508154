"""`tunelab merge --model M --adapter runs/x --out merged/ [--dtype bf16]`."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model and save a standalone model",
        description="Fold a LoRA / rsLoRA / DoRA adapter into the base weights and write sharded safetensors "
                    "with the tokenizer, chat template and every other file of the base. The merged logits are "
                    "checked against base + adapter before anything is written.",
        epilog="example: tunelab merge --model smollm2-135m-instruct --adapter runs/hotel --out merged/hotel",
    )
    p.add_argument("--model", required=True, help="the base model: alias, folder or hub id in the local cache")
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


def run(args) -> int:
    from tunelab.export.merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, force_base=args.force_base,
                           template=args.template, force_template=args.force_template)
    print(report.summary())
    return 0
