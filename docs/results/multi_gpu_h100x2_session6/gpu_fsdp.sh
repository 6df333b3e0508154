#!/bin/bash
# 2 x H100: LoRA on 1 GPU vs FSDP2 on 2 (uncompiled, same samples and adapter init): does FSDP2 train the 1-GPU math?
set -x
mkdir -p $OUT/f
timeout 400 python bench/multi_gpu.py run --samples bench_data/hotel-qwen2.json --modes lora_1gpu,lora_fsdp_2gpu --steps 12 --warmup 3 --no-compile --out $OUT/f/lora_fsdp.json > $OUT/f/lora_fsdp.log 2>&1
echo "rc $?" >> $OUT/f/lora_fsdp.log
tail -6 $OUT/f/lora_fsdp.log
python - <<'PY'
import json, os
d = os.environ["OUT"] + "/f/lora_fsdp"
a = json.load(open(f"{d}/lora_1gpu.json"))["losses"]; b = json.load(open(f"{d}/lora_fsdp_2gpu.json"))["losses"]
print(" ".join(f"{y - x:+.4f}" for x, y in zip(a, b)))
PY
