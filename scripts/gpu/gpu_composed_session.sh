#!/usr/bin/env bash
# Issue 37's first GPU measurement: the hybrid's exact part on one fused flex_attention kernel
# (linearize/ops/hybrid/composed.py, LINEARIZE_FLEX_ATTENTION=1) beside the linear memory on fla's chunk kernel
# (LINEARIZE_FLA_KERNELS=1), on one H100/H200, from the repository root, two calls on the same warm machine:
#
#   KIT=.gpukit/a PHASE=1 OUT=out bash scripts/gpu/gpu_composed_session.sh   # CUDA tests of the composed path
#   KIT=.gpukit/b PHASE=2 OUT=out bash scripts/gpu/gpu_composed_session.sh   # stage-1 speed: PyTorch / flex / flex+fla
#
# The kit as for gpu_default_session.sh (scripts/gpu/make_gpu_kit.sh). Every step has its own time limit and log in
# $OUT; bench-transfer writes its JSON (tokens/s against the teacher's forward) to $OUT/transfer_<variant>.json.
cd "$(dirname "$0")/../.."  # the repository root
source scripts/gpu/gpu_kit.sh  # OUT, KIT, wheels, PYTHONPATH, elapsed, step

if [ "${PHASE}" = 1 ]; then
    cp "$KIT/gguf.part1" /tmp/kit/ &
    step tests 200 python3 -m pytest -v -p no:cacheprovider -n 8 -rA tests/test_composed.py \
        tests/test_fla_kernels.py -k "cuda or forward or accurate"
    wait
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
