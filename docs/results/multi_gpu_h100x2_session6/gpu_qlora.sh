#!/bin/bash
# 2 x H100: QLoRA on 1 GPU vs FSDP2 on 2, both uncompiled (as `tunelab train` runs bitsandbytes layers), one call.
set -x
mkdir -p $OUT/q
python -m pip install --no-index --no-deps --target /tmp/site bench_bnb/*.whl > $OUT/q/pip_bnb.log 2>&1
export PYTHONPATH=/tmp/site
timeout 400 python bench/multi_gpu.py run --samples bench_data/hotel-qwen2.json --modes qlora_1gpu,qlora_fsdp_2gpu --steps 12 --warmup 3 --no-compile --out $OUT/q/qlora_eager.json > $OUT/q/qlora_eager.log 2>&1
echo "rc $?" >> $OUT/q/qlora_eager.log
tail -8 $OUT/q/qlora_eager.log
