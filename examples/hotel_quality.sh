#!/usr/bin/env bash
# The hotel task with dialogue folding and slot-F1 checkpoint selection, end to end:
# check the test file against the training file for leakage, hold out 5% of the training
# dialogues for validation (`tunelab data split`, whole dialogues), train
# (examples/hotel_quality.yaml: folding, slot F1 on validation generations picks the
# checkpoint), read the run (`tunelab report`: curves, task metrics, error breakdown), and
# score the 517-row test set (slot P/R/F1, char BLEU-4) with its error breakdown.
# Extra arguments go to `tunelab train` as key=value overrides.
#   bash examples/hotel_quality.sh                      # a GPU: minutes (bf16)
#   bash examples/hotel_quality.sh num_train_epochs=2
# On a machine that has only the repository, copy the two files into an ignored folder first:
#   mkdir -p runs/hotel_data && cp ../shared/data/hotel/{train,test}.jsonl runs/hotel_data/
# Then `bash examples/hotel_mined_dpo.sh` continues with DPO on the tuned model's mistakes.
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
[ -f "$DATA/train.jsonl" ] || DATA=runs/hotel_data
SPLIT=${SPLIT_DIR:-runs/hotel_split}
RUN=${RUN_DIR:-runs/hotel_quality}
MODEL=${MODEL:-smollm2-135m-instruct}
if command -v tunelab >/dev/null; then TL=(tunelab); else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=(python3 -m tunelab.cli); fi
SECONDS=0
"${TL[@]}" data check "$DATA/train.jsonl" --against "$DATA/test.jsonl" --limit 5
"${TL[@]}" data split "$DATA/train.jsonl" "$SPLIT" --ratios 0.95,0.05,0 --stratify response_role --seed 42
"${TL[@]}" train examples/hotel_quality.yaml "model_name_or_path=$MODEL" "dataset=$SPLIT/train.jsonl" \
    "eval_dataset=$SPLIT/validation.jsonl" "output_dir=$RUN" overwrite_output_dir=true bf16=true disable_tqdm=true "$@"
echo "training: ${SECONDS}s"
"${TL[@]}" report "$RUN"
# A LoRA run is an adapter on MODEL; a full fine-tuning run (the yaml's choice) is the model itself.
if [ -f "$RUN/adapter_config.json" ]; then tuned=(--model "$MODEL" --adapter "$RUN"); else tuned=(--model "$RUN"); fi
"${TL[@]}" eval "${tuned[@]}" --data "$DATA/test.jsonl" --task hotel \
    ${EVAL_BATCH:+--batch-size "$EVAL_BATCH"} --no-progress
if [ -n "${CONSTRAIN:-}" ]; then  # CONSTRAIN=1: the same test rows with search turns held to valid JSON
    "${TL[@]}" eval "${tuned[@]}" --data "$DATA/test.jsonl" --task hotel \
        ${EVAL_BATCH:+--batch-size "$EVAL_BATCH"} --no-progress --constrain-json --output-dir "$RUN/eval_constrained"
fi
echo "total: ${SECONDS}s"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/hotel_quality"
    cp -r "$RUN/trainer_log.jsonl" "$RUN/config.yaml" "$RUN/report" "$RUN/eval" "$RUN/task_eval" \
        "$RUN/eval_constrained" "$OUT/hotel_quality/" 2>/dev/null || true
fi
