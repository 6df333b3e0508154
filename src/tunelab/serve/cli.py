"""`tunelab chat`, `tunelab serve` and `tunelab estimate`."""

from __future__ import annotations

import argparse
import os
import sys

from tunelab.config import DEFAULT_MODEL


def register(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="chat with a model in the terminal (streamed)",
                                 description="Multi-turn chat in the model's own template. "
                                             "Commands: /reset, /system TEXT, /exit.")
    add_model_args(chat)
    chat.add_argument("--adapter", help="a LoRA adapter folder to chat with")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--show-prompt", metavar="MESSAGE", nargs="?", const="Hello!",
                      help="dry run: print the exact prompt MESSAGE (default Hello!) gets, with the tokens "
                           "training learns [[marked]]; loads no weights")
    chat.set_defaults(func=run_chat)

    serve = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API (/v1/chat/completions)",
        description="OpenAI-compatible HTTP API. Several adapters share one base; clients pick one "
                    "with the `model` field (the base is served under its own name).",
        epilog="example: tunelab serve --model smollm2-135m-instruct --adapter hotel=runs/hotel --port 8000")
    add_model_args(serve)
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="an adapter to serve under NAME (repeatable; a bare PATH is named after its folder)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` (visible in `ps`: prefer "
                                         "$TUNELAB_API_KEY or --api-key-file)")
    serve.add_argument("--api-key-file", help="read the API key from this file (first line)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default 32)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests waiting for a batch slot before new ones get 429 (default 256)")
    serve.add_argument("--request-timeout", type=float, default=600,
                       help="seconds a request may take, queueing included (default 600)")
    serve.add_argument("--max-body-mb", type=float, default=4, help="largest request body accepted (default 4 MB)")
    serve.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the key)")
    serve.add_argument("--kv-slots", action=argparse.BooleanOptionalAction, default=None,
                       help="decode in the slots of one static KV cache with CUDA graphs (default: on a GPU "
                            "serving the base model alone; --no-kv-slots: the dynamic batcher; docs/serving.md)")
    serve.set_defaults(func=run_serve)

    est = subparsers.add_parser(
        "estimate", help="estimate GPU memory for training or inference from a model's config",
        description="GPU memory for full / LoRA / QLoRA training or inference, from config.json alone "
                    "(no weights are loaded). Every line shows its formula.",
        epilog="example: tunelab estimate --model qwen2.5-7b-instruct --method qlora --seq-len 2048 --batch 4")
    est.add_argument("--model", required=True, help="a known alias, a model folder or a config.json")
    est.add_argument("--method", default="lora", help="full, lora, qlora or inference")
    est.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (inference: prompt + reply)")
    est.add_argument("--batch", type=int, default=4, help="sequences per step (per GPU)")
    est.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 weights and activations")
    est.add_argument("--optimizer", default="adamw", help="adamw, adamw_8bit, paged_adamw or paged_adamw_8bit")
    est.add_argument("--gradient-checkpointing", action="store_true")
    est.add_argument("--activation-offload", action="store_true", help="tunelab's activation_offload=true")
    est.add_argument("--tiled-mlp", action="store_true", help="tunelab's tiled_mlp=true")
    est.add_argument("--fused-loss", action="store_true", help="tunelab's fused_loss=true (chunked LM head)")
    est.add_argument("--lora-rank", type=int, default=8)
    est.add_argument("--lora-target", default="all-linear", help="all-linear or a comma list (q_proj,v_proj)")
    est.add_argument("--packing", action="store_true", help="unpadded (packed) batches: no attention mask")
    est.add_argument("--quantization-bit", type=int, choices=(4, 8), help="inference with 4/8-bit weights")
    est.set_defaults(func=run_estimate)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--template", help="default: the template the adapter/model was trained with, else the "
                                      "tokenizer's own (auto); or a built-in name or a .jinja file")
    p.add_argument("--force-template", action="store_true",
                   help="use --template even though it prompts differently from the trained template")
    p.add_argument("--quantization-bit", type=int, choices=(4, 8), help="load 4-bit (NF4) or 8-bit weights (CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--context-length", type=int, help="override the model's context length (tokens)")


def template_from_args(args, adapters) -> tuple[object, str]:
    """The tokenizer (the adapter's own where training saved one) and the Jinja source to
    prompt with: the trained template of the adapters/model unless --template prompts the
    same way (or --force-template); TunelabError where two adapters disagree."""
    from pathlib import Path

    from tunelab.data.templates import attach_lock, choose_template, find_lock
    from tunelab.model.adapters import adapter_tokenizer

    folders = list(adapters.values())
    tokenizer = adapter_tokenizer(args.model, folders[0] if folders else None)
    model_dir = Path(args.model).expanduser()
    lock = find_lock(folders + ([model_dir] if model_dir.is_dir() else []))
    attach_lock(tokenizer, lock)
    return tokenizer, choose_template(args.template, tokenizer, lock, force=args.force_template)


def engine_from_args(args, adapters):
    from tunelab.serve.engine import load_engine

    _, template_src = template_from_args(args, adapters)
    return load_engine(args.model, adapters, template=template_src, quantization_bit=args.quantization_bit,
                       device=args.device, dtype=args.dtype, context_length=args.context_length)


def run_chat(args) -> int:
    from tunelab.model.generate import GenerationOptions
    from tunelab.serve.chat import chat_loop
    from tunelab.serve.engine import parse_adapters

    adapters = parse_adapters([args.adapter] if args.adapter else [])
    if args.show_prompt is not None:
        print(show_chat_prompt(args, adapters))
        return 0
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    engine = engine_from_args(args, adapters)
    chat_loop(engine, options, sys.stdin, sys.stdout, system=args.system)
    return 0


def show_chat_prompt(args, adapters) -> str:
    """`chat --show-prompt`: the prompt of the system prompt + MESSAGE, and a reply's tokens marked."""
    from tunelab.data.types import Message
    from tunelab.evaluate.runner import describe_prompt
    from tunelab.evaluate.tasks.base import EvalSample

    tokenizer, template_src = template_from_args(args, adapters)
    prompt = ([Message("system", args.system)] if args.system else []) + [Message("user", args.show_prompt)]
    reply = "(the reply)"
    return describe_prompt(EvalSample("chat", prompt, Message("assistant", reply), reply), tokenizer, template_src)


SERVE_MODULES = ("fastapi", "uvicorn")  # the [serve] extra


def run_serve(args) -> int:
    from tunelab.errors import require_extra

    require_extra(SERVE_MODULES, "serve", "tunelab serve")
    from tunelab.serve.engine import parse_adapters
    from tunelab.serve.server import check_port_free, serve

    api_key = read_api_key(args.api_key, args.api_key_file)
    limits = serve_limits(args)
    adapters = parse_adapters(args.adapter)
    check_port_free(args.host, args.port)  # before minutes of model loading, not after
    engine = engine_from_args(args, adapters)
    names = ", ".join(engine.model_names())
    print(f"serving {names} on http://{args.host}:{args.port}/v1 (context {engine.context_length} tokens, "
          f"batches of up to {limits.max_batch}{', API key required' if api_key else ''})", file=sys.stderr)
    serve(engine, args.host, args.port, api_key=api_key, limits=limits)
    return 0


def read_api_key(given: str | None, key_file: str | None) -> str | None:
    """--api-key, else --api-key-file, else $TUNELAB_API_KEY, else none (open server)."""
    from pathlib import Path

    from tunelab.errors import TunelabError

    if given and key_file:
        raise TunelabError("both --api-key and --api-key-file are given", where="tunelab serve",
                           fix="keep --api-key-file (a key on the command line shows in `ps`)")
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip().splitlines()[:1]
        except (OSError, UnicodeDecodeError) as exc:
            raise TunelabError(f"cannot read the API key file ({exc})", where=key_file,
                               fix="write the key on the first line of a readable UTF-8 file") from None
        if not key or not key[0].strip():
            raise TunelabError("the API key file is empty", where=key_file, fix="write the key on its first line")
        return key[0].strip()
    return given or os.environ.get("TUNELAB_API_KEY") or None


def serve_limits(args):
    from tunelab.errors import TunelabError
    from tunelab.serve.server import Limits

    checks = {"--max-batch-size": args.max_batch_size, "--max-queue": args.max_queue,
              "--request-timeout": args.request_timeout, "--max-body-mb": args.max_body_mb}
    for flag, value in checks.items():
        if not value > 0:  # NaN fails too
            raise TunelabError(f"{flag} must be > 0, got {value}", where=flag, fix=f"drop {flag} for its default")
    return Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_batch=args.max_batch_size,
                  max_waiting=args.max_queue, request_timeout=args.request_timeout, docs=args.docs,
                  kv_slots=args.kv_slots)


def run_estimate(args) -> int:
    from tunelab.serve.estimate import Settings, estimate_memory, format_estimate, load_architecture

    settings = Settings(method=args.method, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype,
                        optimizer=args.optimizer, gradient_checkpointing=args.gradient_checkpointing,
                        lora_rank=args.lora_rank, lora_target=[t.strip() for t in args.lora_target.split(",")],
                        padded=not args.packing, quantization_bit=args.quantization_bit,
                        activation_offload=args.activation_offload, tiled_mlp=args.tiled_mlp,
                        fused_loss=args.fused_loss)
    print(format_estimate(estimate_memory(load_architecture(args.model), settings)))
    return 0
