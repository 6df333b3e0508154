"""`tunelab eval` (generate + score a data set) and `tunelab report` (read a training run)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from tunelab.errors import TunelabError

# The handlers import the evaluation code (torch, transformers) when they run, so that
# `tunelab --help` starts at once (tests/test_cli.py checks no torch at import).

EVAL_EXAMPLES = """examples:
  tunelab eval --model smollm2-135m-instruct --adapter runs/hotel_lora --data test.jsonl --task hotel
  tunelab eval --model M --adapter runs/x --data test.jsonl --metrics bleu,rouge,em,ppl
  tunelab eval --model M --adapter runs/x --data test.jsonl --task hotel --compare-base
  tunelab eval --predictions eval_out/predictions.jsonl --metrics bleu,rouge   # re-score, no model
  tunelab eval --reward-model runs/rm --data heldout_pairs.jsonl        # a reward model's pairwise accuracy
  tunelab eval --model M --adapter runs/x --data test.jsonl --task hotel --reward-model runs/rm --rerank 4 \
      --temperature 1.0                                                  # best of 4 by the reward model
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="generate on a test set and score it (BLEU, ROUGE, slots, ppl...)",
                              description="Generate a prediction for every row of a data set and score it.",
                              epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="alias, local folder or cached hub id; with --backend openai: the served model's name")
    p.add_argument("--adapter", help="a LoRA adapter folder (a run folder or one of its checkpoints)")
    p.add_argument("--data", help="test file (any supported format)")
    p.add_argument("--format", default="auto", help="data format (default: detected)")
    p.add_argument("--task", help="scoring task: generic (default) or hotel (the hotel set)")
    p.add_argument("--metrics", help="comma list, e.g. bleu,rouge,em,ppl (default: the task's)")
    p.add_argument("--template", help="chat template: auto, a built-in name or a .jinja path (default: the one the "
                                      "adapter/model was trained with, else the task's, else the model's own)")
    p.add_argument("--force-template", action="store_true",
                   help="use --template even though it prompts differently from the trained template")
    p.add_argument("--show-prompt", action="store_true",
                   help="dry run: print the exact prompt of the first rows (--limit, default 1) with the "
                        "reference tokens [[marked]] as training saw them; loads no weights")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base model; print both")
    p.add_argument("--predictions", metavar="FILE",
                   help="re-score FILE without generating: JSONL, one object a line, with string `prediction` and "
                        "`reference` (required; hotel: `role\\nbody`, e.g. `search\\n{...}`), optional `task`, "
                        "`source` and `meta` (hotel: {role, arguments}, read from the reference when missing); "
                        "the predictions.jsonl of an earlier `tunelab eval` is one")
    p.add_argument("--limit", type=int, help="use only the first N rows")
    p.add_argument("--output-dir", help="default: ADAPTER/eval, or MODEL/eval for a tunelab run folder, else eval_out")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts decoded together (default: auto: 8 on the CPU; on a GPU as many as half "
                        "the free memory holds, up to 256)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--constrain-json", action="store_true",
                   help="constrained decoding: structured answers must be valid JSON (hotel: search turns, "
                        "with the slot names; generic: the whole answer)")
    p.add_argument("--reward-model", metavar="RUN",
                   help="a stage=rm run folder: alone, --data holds preference pairs and its pairwise accuracy "
                        "is reported; with --rerank N it picks the best of N sampled answers")
    p.add_argument("--rerank", type=int, metavar="N", help="best-of-N: sample N answers per prompt (--temperature "
                                                           "> 0), keep the one --reward-model scores highest")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization-bit", type=int, choices=(4, 8))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    remote = p.add_argument_group("a model behind an OpenAI-compatible server (vLLM, SGLang, tunelab serve)")
    remote.add_argument("--backend", choices=("local", "openai"), default="local",
                        help="openai: ask the server at --base-url for the predictions instead of loading the model")
    remote.add_argument("--base-url", help="e.g. http://127.0.0.1:8000/v1")
    remote.add_argument("--api-key", default=os.environ.get("TUNELAB_API_KEY"), help="default: $TUNELAB_API_KEY")
    remote.add_argument("--api", choices=("completions", "chat"),
                        help="completions (default with --tokenizer): prompts rendered here with the trained "
                             "template, as local eval does; chat: the server applies its own template")
    remote.add_argument("--tokenizer", help="the run / adapter / model folder whose tokenizer and trained template "
                                            "render the prompts (needed for --api completions)")
    remote.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    judge = p.add_argument_group("LLM-as-judge (any OpenAI-compatible endpoint; answers cached on disk)")
    judge.add_argument("--judge-url", help="base URL, e.g. http://127.0.0.1:8001/v1 (enables the judge)")
    judge.add_argument("--judge-model", help="the judge's model name at that endpoint")
    judge.add_argument("--judge-api-key", default=os.environ.get("TUNELAB_JUDGE_API_KEY"),
                       help="default: $TUNELAB_JUDGE_API_KEY")
    judge.add_argument("--judge-dimensions", default="",
                       help='rubric, e.g. "correctness,fluency" or "name=what it measures;..." '
                            "(default: correctness, helpfulness, fluency on 1-5)")
    judge.add_argument("--judge-rps", type=float, default=2.0, help="requests per second (0 = no limit)")
    p.set_defaults(func=run_eval)

    r = subparsers.add_parser("report", help="plot a training run's curves and diagnose them; compare runs",
                              description="Draw loss/perplexity curves of RUN_DIR/trainer_log.jsonl and "
                                          "read them: convergence, over-fitting, memorising, divergence. "
                                          "Several runs (or a sweep folder): overlaid curves, config diff, "
                                          "metrics side by side, each run's diagnosis, the same examples answered.")
    r.add_argument("run_dir", nargs="+", help="a training output folder (holds trainer_log.jsonl); several, or a "
                                              "sweep folder, to compare them")
    r.add_argument("--output-dir", help="where to write report.md/json and the PNGs (default: RUN_DIR/report); "
                                        "comparisons: the sweep folder, else a compare/ folder beside the runs")
    r.add_argument("--metric", default="eval_loss", help="comparisons: what ranks the runs (default eval_loss; "
                                                         "e.g. eval_slot_f1)")
    r.set_defaults(func=report_command)


# --- tunelab eval ----------------------------------------------------------------------

def _output_dir(args) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    if args.predictions:
        return Path(args.predictions).parent
    if args.adapter:
        return Path(args.adapter) / "eval"
    if args.model and (Path(args.model) / "config.yaml").is_file():  # a full fine-tuning run's own folder
        return Path(args.model) / "eval"
    return Path("eval_out")


def _options(args):
    from tunelab.model.generate import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _check_args(args) -> None:
    if args.predictions:
        if args.compare_base:
            raise TunelabError("--compare-base needs generation, --predictions skips it", where="command line",
                               fix="run the two evaluations, or drop --predictions")
        return
    if not args.data:
        raise TunelabError("no test data given", where="command line",
                           fix="add --data path/to/test.jsonl (or --predictions FILE to re-score)")
    if args.backend == "openai":
        _check_remote_args(args)
    if args.rerank is not None and (not args.reward_model or args.rerank < 2 or args.temperature <= 0):
        raise TunelabError("--rerank N samples N answers and keeps the reward model's favourite", where="command line",
                           fix="give --reward-model RUN, N >= 2 and --temperature > 0 (e.g. --rerank 4 "
                               "--temperature 1.0)")
    if bool(args.judge_url) != bool(args.judge_model):
        raise TunelabError("the judge needs both --judge-url and --judge-model", where="command line",
                           fix="e.g. --judge-url http://127.0.0.1:8001/v1 --judge-model qwen2.5-72b-instruct")
    if args.compare_base and not args.adapter:
        raise TunelabError("--compare-base compares the base model with an adapter, but none was given",
                           where="command line", fix="add --adapter runs/your_run")
    for name in ("limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise TunelabError(f"--{name.replace('_', '-')} must be > 0, got {value}", where="command line",
                               fix=f"e.g. --{name.replace('_', '-')} 8")


def _check_remote_args(args) -> None:
    if not args.base_url:
        raise TunelabError("--backend openai needs --base-url", where="command line",
                           fix="e.g. --base-url http://127.0.0.1:8000/v1 --model NAME_THE_SERVER_USES")
    if args.adapter or args.compare_base or args.quantization_bit:
        raise TunelabError("--adapter, --compare-base and --quantization-bit load a model here; --backend openai "
                           "asks a server", where="command line",
                           fix="serve the adapter (vllm serve --enable-lora / tunelab serve) and name it with --model")
    if args.api == "completions" and not args.tokenizer:
        raise TunelabError("--api completions renders prompts here and needs --tokenizer", where="command line",
                           fix="add --tokenizer runs/your_run (the trained folder), or use --api chat")
    if args.concurrency <= 0:
        raise TunelabError(f"--concurrency must be > 0, got {args.concurrency}", where="command line",
                           fix="e.g. --concurrency 8")


def _judge_scores(args, rows: list[dict], out_dir: Path) -> dict:
    """Mean judge score per rubric dimension (`judge_<name>`), or nothing without --judge-url.

    Judgements go to OUT/judgements.jsonl; answers are cached under $TUNELAB_CACHE/judge, so
    a rerun (or a rerun after the endpoint went down) only asks for what is missing.
    """
    if not args.judge_url:
        return {}
    from tunelab.evaluate.judge import JudgeItem, JudgeSettings, judge

    settings = JudgeSettings.for_endpoint(args.judge_url, args.judge_model, args.judge_api_key,
                                          args.judge_dimensions, requests_per_second=args.judge_rps)
    items = [JudgeItem(str(r.get("prompt", "")), str(r.get("reference", "")), str(r.get("prediction", "")))
             for r in rows]
    result = judge(items, settings, results_path=out_dir / "judgements.jsonl")
    print(f"judge: {len(result.judgements)} scored, {result.unparseable} unreadable answers", file=sys.stderr)
    return {f"judge_{name}": value for name, value in result.mean_scores().items()} | {
        "judge_unparseable": result.unparseable}


def run_eval(args) -> int:
    from tunelab.evaluate import runner
    from tunelab.evaluate.breakdown import write_breakdown
    from tunelab.evaluate.tasks import get_task

    _check_args(args)
    if args.predictions:
        return _rescore(args)
    if args.reward_model and not args.rerank:
        return _pairwise(args)
    task = get_task(args.task or "generic")
    metrics = runner.parse_metrics(task, args.metrics)
    options = _options(args)
    if args.constrain_json:
        options = dataclasses.replace(options, json_after=task.json_marker, json_keys=task.json_keys)
    samples = task.load(args.data, args.format, args.limit)  # bad rows fail before a model loads
    if args.backend == "openai":
        return _eval_remote(args, task, metrics, options, samples)

    from tunelab.data.templates import choose_template, template_lock
    from tunelab.model.adapters import adapter_tokenizer
    from tunelab.model.loader import load_model

    tokenizer = adapter_tokenizer(args.model, args.adapter)  # carries the trained template, if any
    lock = template_lock(tokenizer)
    template_src = choose_template(args.template, tokenizer, lock, force=args.force_template,
                                   fallback=task.default_template or "auto")
    template = args.template or (lock.template if lock else task.default_template or "auto")
    if args.show_prompt:
        for sample in samples[:args.limit or 1]:
            print(runner.describe_prompt(sample, tokenizer, template_src))
        return 0
    model = load_model(args.model, dtype=args.dtype, device=args.device, quantization_bit=args.quantization_bit)
    out_dir = _output_dir(args)
    info = {"task": task.name, "metrics": list(metrics), "model": args.model, "data": args.data,
            "template": template, "generation": dataclasses.asdict(options)}

    rm = None
    if args.rerank:
        from tunelab.model.value_head import load_reward_model

        rm = load_reward_model(args.reward_model, device=args.device, dtype=args.dtype)
        info |= {"reward_model": args.reward_model, "rerank": args.rerank}

    def score_model(model, label: str) -> dict:
        if rm is not None:
            from tunelab.evaluate.rerank import rerank_predict

            generated = rerank_predict(model, tokenizer, samples, template_src, options, args.rerank, rm,
                                       task=task.name, batch_size=args.batch_size, progress=not args.no_progress,
                                       desc=label)
        else:
            generated = runner.predict(model, tokenizer, samples, template_src, options, task=task.name,
                                       batch_size=args.batch_size, with_ppl="ppl" in metrics,
                                       progress=not args.no_progress, desc=label)
        summary = runner.score(task, generated.rows, metrics)
        where = out_dir / label if args.compare_base else out_dir
        summary |= _judge_scores(args, generated.rows, where)
        runner.write_results(where, generated.rows, summary, {**info, "speed": generated.speed})
        print(write_breakdown(task, generated.rows, where), file=sys.stderr)
        print(f"{label}: {len(samples)} samples in {generated.speed['seconds']} s "
              f"({generated.speed['samples_per_s']} samples/s, {generated.speed['tokens_per_s']} tokens/s)",
              file=sys.stderr)
        return summary

    if args.compare_base:
        base = score_model(model, "base")
    if args.adapter:
        from tunelab.model.adapters import load_adapter

        model = load_adapter(model, args.adapter)
        if not args.quantization_bit:
            # Fold the adapter into the weights for generation: the same function, without
            # PEFT's extra matmuls and Python per layer (decoding is launch-bound on small models).
            model = model.merge_and_unload()
        info["adapter"] = args.adapter
    tuned = score_model(model, "tuned" if args.compare_base else "eval")
    if args.compare_base:
        print(runner.write_comparison(out_dir, base, tuned, info))
    else:
        print(runner.markdown_table(tuned))
    _warn_empty(tuned)
    print(f"results in {out_dir}", file=sys.stderr)
    return 0


def _eval_remote(args, task, metrics, options, samples) -> int:
    """Predictions from the server at --base-url, scored and written as a local run's."""
    from tunelab.evaluate import runner
    from tunelab.evaluate.remote import Endpoint, predict_remote

    if "ppl" in metrics:
        raise TunelabError("perplexity needs the model's logits, which an OpenAI server does not give",
                           where="--metrics", fix="drop ppl from --metrics with --backend openai")
    api = args.api or ("completions" if args.tokenizer else "chat")
    prompts, stop, info = None, (), {}
    if api == "completions":
        from tunelab.data.templates import choose_template, stop_tokens, template_lock
        from tunelab.model.adapters import adapter_tokenizer

        tokenizer = adapter_tokenizer(args.tokenizer, None)
        lock = template_lock(tokenizer)
        template_src = choose_template(args.template, tokenizer, lock, force=args.force_template,
                                       fallback=task.default_template or "auto")
        ids = runner.encode_prompts(samples, tokenizer, template_src)
        prompts = [tokenizer.decode(p, skip_special_tokens=False) for p in ids]
        stop = stop_tokens(tokenizer, template_src)
        info["template"] = args.template or (lock.template if lock else task.default_template or "auto")
    endpoint = Endpoint(args.base_url, args.model, args.api_key, api, args.concurrency)
    generated = predict_remote(endpoint, samples, options, task=task.name, prompts=prompts, stop=stop,
                               progress=not args.no_progress)
    out_dir = _output_dir(args)
    summary = runner.score(task, generated.rows, metrics) | _judge_scores(args, generated.rows, out_dir)
    runner.write_results(out_dir, generated.rows, summary,
                         {"task": task.name, "metrics": list(metrics), "model": args.model, "data": args.data,
                          "base_url": args.base_url, "generation": dataclasses.asdict(options), **info,
                          "speed": generated.speed})
    print(f"{len(samples)} samples in {generated.speed['seconds']} s ({generated.speed['samples_per_s']} samples/s "
          f"from {args.base_url}, {api} API)", file=sys.stderr)
    print(runner.markdown_table(summary))
    _warn_empty(summary)
    return 0


def _pairwise(args) -> int:
    """A reward model's pairwise accuracy on the preference pairs of --data."""
    from tunelab.evaluate import runner
    from tunelab.evaluate.rerank import pairwise_accuracy
    from tunelab.io import write_json_atomic
    from tunelab.model.value_head import load_reward_model

    rm = load_reward_model(args.reward_model, device=args.device, dtype=args.dtype)
    summary = pairwise_accuracy(rm, args.data, args.format, args.limit, args.template)
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.reward_model) / "eval"
    write_json_atomic(out_dir / "scores.json", {"scores": summary, "reward_model": args.reward_model,
                                                "data": args.data})
    print(runner.markdown_table(summary))
    return 0


def _rescore(args) -> int:
    from tunelab.evaluate import runner
    from tunelab.evaluate.breakdown import write_breakdown
    from tunelab.evaluate.tasks import get_task

    rows = runner.read_predictions(args.predictions)
    task = get_task(args.task or rows[0].get("task") or "generic")
    metrics = runner.parse_metrics(task, args.metrics)
    summary = runner.score(task, rows, metrics) | _judge_scores(args, rows, _output_dir(args))
    runner.write_results(_output_dir(args), rows, summary,
                         {"task": task.name, "metrics": list(metrics), "predictions": args.predictions})
    print(write_breakdown(task, rows, _output_dir(args)), file=sys.stderr)
    print(runner.markdown_table(summary))
    _warn_empty(summary)
    return 0


def _warn_empty(summary: dict) -> None:
    if summary.get("empty_predictions"):
        print(f"note: {summary['empty_predictions']} of {summary['samples']} predictions were empty "
              "(scored 0, kept in every average)", file=sys.stderr)


# --- tunelab report --------------------------------------------------------------------

def report_command(args) -> int:
    from tunelab.evaluate.report import format_findings, run_report
    from tunelab.train.runlog import LOG_NAME

    [run_dir, *others] = args.run_dir
    path = Path(run_dir)
    out_dir = Path(args.output_dir) if args.output_dir else None
    if not others and (path / "chain.json").is_file():  # a chain of stages (tunelab/chain.py)
        from tunelab.evaluate.chain_report import run_chain_report

        print(run_chain_report(path, out_dir))
        return 0
    # Several runs, a sweep folder, a folder of runs: the comparison, which lives in a later stage
    # (board) and is lent to this command by the top-level CLI.
    holds_runs = path.is_dir() and not (path / LOG_NAME).is_file() and not (path.parent / LOG_NAME).is_file()
    if (others or holds_runs) and getattr(args, "compare_runs", None):
        return args.compare_runs(args.run_dir, args.output_dir, args.metric)
    result = run_report(path, out_dir)
    print(format_findings(result))
    return 0
