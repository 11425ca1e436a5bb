#!/usr/bin/env bash
# The multi-GPU checks on a machine with 2+ GPUs, one script so that one call does them all:
#   1. correctness over NCCL: the two-instance GPU test (a tiny Llama, KV split over 2 GPUs,
#      tokens equal one instance's) and dist_attention.py's token check (Llama-3-8B shapes in
#      float32: in bf16, random weights' near-tied logits flip when the KV is split);
#   2. DistAttention overhead: decode step time with the KV split over 2 GPUs vs local, with CUDA
#      graphs for local steps (the engine's default) and with every step eager;
#   3. pooled_vs_static.py on 2 GPUs (tiny model, the trace made for stranding).
# Each step has its own time limit, so one that hangs doesn't take the others with it.
#
#     bash benchmarks/multi_gpu.sh [CONTEXT]        # from the repository root; CONTEXT 120000
# (below the model's 131072 positions). Results: benchmarks/results/multi_gpu_h200x2.txt,
# summarised in docs/benchmarks.md.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
context=${1:-120000}
l3=$(mktemp -d)
python3 -c "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import decode_e2e; \
decode_e2e.write_config(pathlib.Path('$l3'), False)"

step() {  # step SECONDS COMMAND...: print the command, run it under a time limit
    echo "\$ ${*:2}"
    timeout "$1" "${@:2}" 2>&1 | grep -v -e Warning -e _warn_once
}

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
step 240 python3 -m pytest -q tests/test_gpu_engine.py -k two_instances
step 200 python3 -P benchmarks/dist_attention.py --device cuda --model "$l3" --load-format dummy \
    --context "$context" --chunk 8192 --steps 16 --instances 1 2
step 200 python3 -P benchmarks/dist_attention.py --device cuda --model "$l3" --load-format dummy \
    --context "$context" --chunk 8192 --steps 16 --instances 1 2 --enforce-eager
step 200 python3 -P benchmarks/dist_attention.py --device cuda --model "$l3" --load-format dummy \
    --context 8192 --chunk 8192 --steps 16 --instances 1 2 --dtype float32
step 200 python3 -P benchmarks/pooled_vs_static.py --device cuda --instances 2 \
    --trace benchmarks/traces/halfplus_4x1k.jsonl --time-scale 0.25
