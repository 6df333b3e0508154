#!/usr/bin/env bash
# Dialogue folding, end to end on one GPU: the hotel LoRA recipe (examples/hotel_lora.yaml,
# 2 epochs, bf16) once per row (fold_dialogues=false) and once folded, on the same split,
# each timed from start to the saved adapter. Both score the 53 validation rows by generation
# at each epoch end (eval_task=hotel), so the speed-up is read next to slot F1 / BLEU-4.
# The folded run has fewer, longer sequences: at 16 sequences per step it takes ~2.7x fewer
# optimizer steps; FOLDED_ARGS (default: 8 sequences per step) keeps answers-per-step close.
#   mkdir -p runs/hotel_data && cp ../shared/data/hotel/{train,test}.jsonl runs/hotel_data/
#   bash bench/fold_speed.sh            # prints one line per run; logs in runs/fold_*/
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
[ -f "$DATA/train.jsonl" ] || DATA=runs/hotel_data
FOLDED_ARGS=${FOLDED_ARGS:-gradient_accumulation_steps=2}
if command -v tunelab >/dev/null; then TL=(tunelab); else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=(python3 -m tunelab.cli); fi
common=(examples/hotel_lora.yaml "dataset=$DATA/train.jsonl" bf16=true disable_tqdm=true overwrite_output_dir=true
        eval_strategy=epoch eval_on_start=false eval_task=hotel eval_generate_samples=64 per_device_eval_batch_size=64
        save_strategy=no load_best_model_at_end=false plot_loss=false report_to=jsonl)
for fold in false true; do
    extra=(); [ "$fold" = true ] && read -r -a extra <<<"$FOLDED_ARGS"
    start=$(date +%s.%N)
    "${TL[@]}" train "${common[@]}" "fold_dialogues=$fold" "output_dir=runs/fold_$fold" "${extra[@]}" "$@" \
        2> "runs/fold_$fold.log" || { tail -20 "runs/fold_$fold.log"; exit 1; }
    end=$(date +%s.%N)
    python3 - "$fold" "$start" "$end" "runs/fold_$fold/trainer_log.jsonl" <<'PY'
import json, sys
fold, start, end, log = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rows = [json.loads(line) for line in open(log)]
last = [r for r in rows if "eval_loss" in r][-1]
steps = max(r["step"] for r in rows)
print(f"fold_dialogues={fold}: {end - start:.1f} s end to end, {steps} steps, eval_loss {last['eval_loss']:.4f}, "
      f"val slot_f1 {last.get('eval_slot_f1', float('nan')):.2f}, val bleu4 {last.get('eval_bleu4', float('nan')):.2f}")
PY
done
