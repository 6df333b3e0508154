#!/usr/bin/env bash
# Dialogue folding, end to end on one GPU: the reference recipe (examples/hotel_lora.yaml:
# LoRA r=8, 4 x 4 = 16 rows a step, 2 epochs, lr 2e-4 linear, bf16) once per row
# (fold_dialogues=false) and once folded (the default), on the same split of the hotel train
# set (`tunelab data split`: 5% of the dialogues held out), then both adapters scored by
# generation on the validation rows and on the 517-row test set (slot F1, char BLEU-4).
# Folding keeps the math: the same optimizer steps, schedule and answers a step; only the
# shared dialogue prefixes are computed once. Training is timed from the command's start to
# the saved adapter (data, model load, validation losses and checkpoints included).
#   bash bench/fold_speed.sh                         # both runs, then the comparison line
#   FOLDS=false bash bench/fold_speed.sh; FOLDS=auto bash bench/fold_speed.sh   # one run a call
# Extra arguments go to both `tunelab train` runs as key=value overrides. Each run leaves
# $RUNS/fold_<fold>/fold_speed.json (RUNS=runs unless set); with OUT set, logs and scores are
# copied to $OUT/<run folder>. The run log's closing line says where the time went (set-up, first
# step, the other steps, evaluation, checkpoints, final save).
# EVAL_LIMIT=N scores only the first N rows of each file (a quick check of the script).
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
[ -f "$DATA/train.jsonl" ] || DATA=runs/hotel_data
MODEL=${MODEL:-smollm2-135m-instruct}
SPLIT=runs/fold_split
if command -v tunelab >/dev/null; then TL=(tunelab); else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=(python3 -m tunelab.cli); fi
[ -f "$SPLIT/validation.jsonl" ] || "${TL[@]}" data split "$DATA/train.jsonl" "$SPLIT" --ratios 0.95,0.05,0 \
    --stratify response_role --seed 42 >/dev/null
for fold in ${FOLDS:-false auto}; do
    run=${RUNS:-runs}/fold_$fold; mkdir -p "${RUNS:-runs}"
    start=$(date +%s.%N)
    "${TL[@]}" train examples/hotel_lora.yaml "model_name_or_path=$MODEL" "dataset=$SPLIT/train.jsonl" \
        "eval_dataset=$SPLIT/validation.jsonl" val_size=0 "fold_dialogues=$fold" "output_dir=$run" \
        overwrite_output_dir=true bf16=true disable_tqdm=true plot_loss=false report_to=jsonl "$@" \
        2> "$run.log" || { tail -20 "$run.log"; exit 1; }
    end=$(date +%s.%N)
    grep -E "folded|steps per epoch|^speed|^done" "$run.log" || true
    for split in validation test; do
        file=$SPLIT/validation.jsonl; [ "$split" = test ] && file=$DATA/test.jsonl
        "${TL[@]}" eval --model "$MODEL" --adapter "$run" --data "$file" --task hotel --no-progress \
            --batch-size "${EVAL_BATCH:-128}" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} --output-dir "$run/eval_$split" > /dev/null 2>> "$run.log"
    done
    python3 - "$fold" "$start" "$end" "$run" <<'PY'
import json, sys
fold, start, end, run = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
log = [json.loads(line) for line in open(f"{run}/trainer_log.jsonl")]
scores = {split: json.load(open(f"{run}/eval_{split}/scores.json"))["scores"] for split in ("validation", "test")}
result = {"fold_dialogues": fold, "train_seconds": round(end - start, 1), "steps": max(r["step"] for r in log),
          "eval_loss": [r for r in log if "eval_loss" in r][-1]["eval_loss"],
          **{f"{split}_{k}": scores[split].get(k) for split in scores for k in ("slot_f1", "bleu4")},
          "where_the_time_went": next((line.strip() for line in open(f"{run}.log") if line.startswith("done:")), None)}
json.dump(result, open(f"{run}/fold_speed.json", "w"), indent=1)
print(json.dumps(result))
PY
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/$run"
        cp -r "$run.log" "$run/trainer_log.jsonl" "$run/config.yaml" "$run/fold_speed.json" "$run/eval_validation" \
            "$run/eval_test" "$OUT/$run/"
    fi
done
python3 - "${RUNS:-runs}" <<'PY'
import json, os, sys
runs = {f: json.load(open(f"{sys.argv[1]}/fold_{f}/fold_speed.json")) for f in ("false", "auto")
        if os.path.exists(f"{sys.argv[1]}/fold_{f}/fold_speed.json")}
for f, r in runs.items():
    print(f"fold_dialogues={f}: {r['train_seconds']:.1f} s training end to end, {r['steps']} steps, "
          f"eval_loss {r['eval_loss']:.4f}; validation slot F1 {r['validation_slot_f1']:.2f}, BLEU-4 "
          f"{r['validation_bleu4']:.2f}; test slot F1 {r['test_slot_f1']:.2f}, BLEU-4 {r['test_bleu4']:.2f}")
if len(runs) == 2:
    print(f"folding: {runs['false']['train_seconds'] / runs['auto']['train_seconds']:.2f}x faster end to end")
PY
