#!/usr/bin/env bash
# The hotel task with dialogue folding and slot-F1 checkpoint selection, end to end:
# train (examples/hotel_quality.yaml), read the run (`tunelab report`: curves, task metrics,
# error breakdown at the best step), score the 517-row test set (slot P/R/F1, char BLEU-4)
# with its error breakdown, and check the test file against the training file for leakage.
# Extra arguments go to `tunelab train` as key=value overrides.
#   bash examples/hotel_quality.sh                      # a GPU: minutes (bf16)
#   HOTEL_DATA=runs/hotel_data bash examples/hotel_quality.sh num_train_epochs=2
# On a machine that has only the repository, copy the two files into an ignored folder first:
#   mkdir -p runs/hotel_data && cp ../shared/data/hotel/{train,test}.jsonl runs/hotel_data/
# Results land in RUN_DIR (and are copied to $OUT when that is set).
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
[ -f "$DATA/train.jsonl" ] || DATA=runs/hotel_data
RUN=${RUN_DIR:-runs/hotel_quality}
MODEL=${MODEL:-smollm2-135m-instruct}
if command -v tunelab >/dev/null; then TL=(tunelab); else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=(python3 -m tunelab.cli); fi
SECONDS=0
"${TL[@]}" data check "$DATA/train.jsonl" --against "$DATA/test.jsonl" --limit 5
"${TL[@]}" train examples/hotel_quality.yaml "model_name_or_path=$MODEL" "dataset=$DATA/train.jsonl" \
    "output_dir=$RUN" overwrite_output_dir=true bf16=true disable_tqdm=true "$@"
echo "training: ${SECONDS}s"
"${TL[@]}" report "$RUN"
"${TL[@]}" eval --model "$MODEL" --adapter "$RUN" --data "$DATA/test.jsonl" --task hotel \
    --batch-size "${EVAL_BATCH:-128}" --no-progress
echo "total: ${SECONDS}s"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/run"
    cp -r "$RUN/trainer_log.jsonl" "$RUN/config.yaml" "$RUN/report" "$RUN/eval" "$RUN/task_eval" "$OUT/run/" 2>/dev/null || true
fi
