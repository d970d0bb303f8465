#!/usr/bin/env bash
# Issue 37's first GPU measurement: the hybrid's exact part on one fused flex_attention kernel
# (linearize/ops/hybrid/composed.py, LINEARIZE_FLEX_ATTENTION=1) beside the linear memory on fla's chunk kernel
# (LINEARIZE_FLA_KERNELS=1), on one H100/H200, from the repository root, two calls on the same warm machine:
#
#   KIT=.gpukit/a PHASE=1 OUT=out bash scripts/gpu/gpu_composed_session.sh   # CUDA tests of the composed path
#   KIT=.gpukit/b PHASE=2 OUT=out bash scripts/gpu/gpu_composed_session.sh   # stage-1 speed: PyTorch / flex / flex+fla
#   KIT=.gpukit/b PHASE=3 OUT=out bash scripts/gpu/gpu_composed_session.sh   # decode: captured graph vs eager step
#
# The kit as for gpu_default_session.sh (scripts/gpu/make_gpu_kit.sh). Every step has its own time limit and log in
# $OUT; bench-transfer writes its JSON (tokens/s against the teacher's forward) to $OUT/transfer_<variant>.json.
cd "$(dirname "$0")/../.."  # the repository root
source scripts/gpu/gpu_kit.sh  # OUT, KIT, wheels, PYTHONPATH, elapsed, step

if [ "${PHASE}" = 1 ]; then
    cp "$KIT/gguf.part1" /tmp/kit/ &
    step tests 200 python3 -m pytest -v -p no:cacheprovider -n 8 -rA tests/test_composed.py \
        tests/test_fla_kernels.py tests/test_static_step.py -k "cuda or forward or accurate"
    wait
elif [ "${PHASE}" = 3 ]; then  # an untrained conversion of the default recipe (speed does not depend on the weights)
    bundled_model_and_data
    step convert 150 python3 -m linearize.cli convert --tokens 0 --lora-tokens 0 --eval-tokens 1024 --device cuda \
        --cache-score recall --out /tmp/run0 --no-progress
    for mode in captured eager; do
        flag=$([ $mode = eager ] && echo --eager-decode)
        step "bench_$mode" 150 python3 -m linearize.cli bench /tmp/run0 --device cuda --contexts 4k,16k \
            --decode-contexts 4k,16k,64k --decode-tokens 64 $flag
        cp /tmp/run0/bench*.json "$OUT"/ 2>/dev/null
    done
else
    bundled_model_and_data
    for variant in torch:0:0 flex:1:0 flex_fla:1:1; do
        IFS=: read -r name flex fla <<< "$variant"
        LINEARIZE_FLEX_ATTENTION=$flex LINEARIZE_FLA_KERNELS=$fla step "transfer_$name" 120 \
            python3 -m linearize.cli bench-transfer --device cuda --attention lolcats --steps 10 \
            --out "$OUT/transfer_$name.json"
    done
fi
echo "phase ${PHASE} done in $(elapsed) s"
