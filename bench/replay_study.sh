#!/usr/bin/env bash
# Replay against forgetting, measured (issue 20; docs/multistage.md, numbers in docs/results.md).
# Stage 1 learns the hotel search calls (444 rows, slot F1 on held-out dialogues); stage 2 then
# learns the assistant replies (610 rows) from stage 1's adapter, once without replay and once
# with 20% of stage 1's training rows replayed. Stage 1's held-out search rows are an eval set
# throughout, so the table at the end is stage 1's loss and slot F1 before, after stage 1, and
# after stage 2 without / with replay. About 5 minutes on one H100 for the embedded 135M model.
#   bash bench/replay_study.sh                      # extra key=value arguments go to every run
# On a machine that has only the repository: mkdir -p runs/hotel_data && cp ../shared/data/hotel/train.jsonl runs/hotel_data/
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
[ -f "$DATA/train.jsonl" ] || DATA=runs/hotel_data
OUT_DIR=${RUN_DIR:-runs/replay_study}
PY=${PYTHON:-python3}
if command -v tunelab >/dev/null; then TL=(tunelab); else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=("$PY" -m tunelab.cli); fi
SECONDS=0
rm -rf "$OUT_DIR/no_replay" "$OUT_DIR/replay"  # a fresh measurement (a kept chain.json would skip its stages)
mkdir -p "$OUT_DIR/data"
# The two tasks: rows whose answer is a search call, rows whose answer is a reply.
"$PY" - "$DATA/train.jsonl" "$OUT_DIR/data" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
for role in ("search", "assistant"):
    with open(f"{sys.argv[2]}/{role}.jsonl", "w", encoding="utf-8") as out:
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if json.loads(r["response"])["role"] == role)
PY
COMMON=(model_name_or_path=${MODEL:-smollm2-135m-instruct} dataset_format=hotel template=hotel cutoff_len=4096
        finetuning_type=lora lora_rank=8 lora_alpha=32 per_device_train_batch_size=8 per_device_eval_batch_size=64
        learning_rate=2e-4 lr_scheduler_type=linear val_size=0.1 eval_strategy=steps eval_task=hotel
        eval_generate_samples=64 eval_max_new_tokens=128 save_steps=1000 logging_steps=5 seed=42
        bf16=${BF16:-true} disable_tqdm=true overwrite_output_dir=true)
# Without replay: a two-stage chain (stage 1 search, stage 2 replies), its eval set = stage 1's validation rows.
cat > "$OUT_DIR/chain.yaml" <<YAML
output_dir: $OUT_DIR/no_replay
eval_sets: {search: search}
stages:
  - {name: search, dataset: $OUT_DIR/data/search.jsonl, num_train_epochs: 3, eval_steps: 40}
  - {name: reply, dataset: $OUT_DIR/data/assistant.jsonl, max_steps: 120, eval_steps: 40}
YAML
"${TL[@]}" train "$OUT_DIR/chain.yaml" "${COMMON[@]}" "$@"
STAGE1="$OUT_DIR/no_replay/stage-1-search"
# With replay: the same stage 2 from the same stage-1 adapter, 20% of stage 1's training rows mixed in.
"${TL[@]}" train "${COMMON[@]}" "dataset=$OUT_DIR/data/assistant.jsonl" max_steps=120 eval_steps=40 \
    "adapter_name_or_path=$STAGE1" "replay={data: $STAGE1, fraction: 0.2}" "eval_sets={search: $STAGE1}" \
    "output_dir=$OUT_DIR/replay" "$@"
echo "training: ${SECONDS}s"
"${TL[@]}" report "$OUT_DIR/no_replay" >/dev/null
"$PY" - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path

def log(run):
    return [json.loads(l) for l in (Path(run) / "trainer_log.jsonl").read_text().splitlines() if l.strip()]

def last(rows, key):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else float("nan")

out = Path(sys.argv[1])
s1, s2, rp = log(out / "no_replay/stage-1-search"), log(out / "no_replay/stage-2-reply"), log(out / "replay")
first = next(r for r in s1 if "eval_loss" in r)
print("\nstage 1 (hotel search calls), its held-out rows:")
print(f"| when | search loss | search slot F1 | reply loss (stage 2 validation) |\n| --- | ---: | ---: | ---: |")
print(f"| before training | {first['eval_loss']:.4f} | {first.get('eval_slot_f1', float('nan')):.2f} | |")
print(f"| after stage 1 | {last(s1, 'eval_loss'):.4f} | {last(s1, 'eval_slot_f1'):.2f} | |")
for name, rows in (("after stage 2, no replay", s2), ("after stage 2, 20% replay", rp)):
    print(f"| {name} | {last(rows, 'eval_search_loss'):.4f} | {last(rows, 'eval_search_slot_f1'):.2f} "
          f"| {last(rows, 'eval_loss'):.4f} |")
PY
echo "total: ${SECONDS}s"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/replay_study"
    cp -r "$OUT_DIR/no_replay/forgetting.md" "$OUT_DIR/no_replay/report" "$OUT_DIR/replay/trainer_log.jsonl" \
        "$OUT_DIR/replay/data_mixture.json" "$OUT/replay_study/" 2>/dev/null || true
    for s in stage-1-search stage-2-reply; do cp "$OUT_DIR/no_replay/$s/trainer_log.jsonl" "$OUT/replay_study/$s.jsonl"; done
fi
