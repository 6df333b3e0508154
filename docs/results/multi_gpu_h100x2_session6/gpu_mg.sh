#!/bin/bash
# 2 x H100: QLoRA under FSDP2 eager and compiled, DeepSpeed ZeRO-3 (eager), each bounded in time.
set -x
mkdir -p $OUT/mg
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/mg/gpus.txt
python -m pip install --no-index --no-deps --target /tmp/site bench_bnb/*.whl > $OUT/mg/pip_bnb.log 2>&1
python -m pip install --no-index --no-deps --target /tmp/site bench_ds/deepspeed-0.18.3-py3-none-any.whl bench_ds/hjson-*.whl bench_ds/pydantic-*.whl bench_ds/pydantic_core-*.whl bench_ds/annotated_types-*.whl bench_ds/typing_inspection-*.whl > $OUT/mg/pip_ds.log 2>&1
export PYTHONPATH=/tmp/site
python -c "import bitsandbytes, deepspeed; print(bitsandbytes.__version__, deepspeed.__version__)" >> $OUT/mg/pip_ds.log 2>&1
S=bench_data/hotel-qwen2.json
timeout 170 python bench/multi_gpu.py run --samples $S --modes qlora_fsdp_2gpu --steps 6 --warmup 2 --no-compile --out $OUT/mg/qlora_eager.json > $OUT/mg/qlora_eager.log 2>&1
echo "qlora eager rc $?" >> $OUT/mg/rc.txt
timeout 150 python bench/multi_gpu.py run --samples $S --modes lora_ds_zero3_2gpu --steps 6 --warmup 2 --out $OUT/mg/zero3.json > $OUT/mg/zero3.log 2>&1
echo "zero3 rc $?" >> $OUT/mg/rc.txt
timeout 240 python bench/multi_gpu.py run --samples $S --modes qlora_fsdp_2gpu --steps 6 --warmup 3 --out $OUT/mg/qlora_compiled.json > $OUT/mg/qlora_compiled.log 2>&1
echo "qlora compiled rc $?" >> $OUT/mg/rc.txt
