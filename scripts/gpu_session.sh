#!/usr/bin/env bash
# The GPU run behind docs/results/families.json (issue 16) and docs/results/recall*.json (issue 12), in one command on
# one H100/H200 with the bundled model and data installed; about 8 minutes. Run from the repository root:
#
#     OUT=runs/gpu-session bash scripts/gpu_session.sh
#
# Phase 1, in parallel: every conversion at the default budget (bfloat16 teacher), and the fla kernel tests.
#   families/<preset>     the presets of the families comparison (lolcats is also the run the recall study reads)
#   recall/cache64        --cache 64: stage 1 and 2 trained with the sparse cache in place
#   recall/cache64-retr   the same with a quarter of the training rows look-up exercises (--retrieval-fraction 0.25)
# Phase 2, in parallel: `linearize compare` over the families (it resumes the finished conversions: no training),
# and scripts/recall_table.py on the default run (training-free caches, kept softmax layers) and the cache runs.
# Each step's output goes to $OUT/logs; the JSON results to $OUT. A step that fails leaves the others running.
set -u
OUT=${OUT:-runs/gpu-session}
BUDGET=${BUDGET:-500}  # seconds for the whole script; phase 2 gets what phase 1 leaves
mkdir -p "$OUT/logs"
T0=$(date +%s)
L="python3 -m linearize.cli"
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

convert() {  # convert NAME OUTDIR [options]
    local name=$1 dir=$2; shift 2
    $L convert --device cuda --no-progress --out "$dir" "$@" > "$OUT/logs/convert-$name.log" 2>&1
    echo "convert $name: rc $? at $(( $(date +%s) - T0 )) s"
}
FAMILIES="lolcats transnormer transnormer-norm nalaformer"
for f in $FAMILIES; do convert "$f" "runs/families/$f" --attention "$f" & done
convert cache64 runs/recall/cache64 --cache 64 &
convert cache64-retr runs/recall/cache64-retr --cache 64 --retrieval-fraction 0.25 &
timeout 150 python3 -m pytest -q tests/test_fla_kernels.py > "$OUT/logs/fla_tests.log" 2>&1 &
wait
echo "phase 1 done at $(( $(date +%s) - T0 )) s"

timeout $(( $(left) - 10 )) $L compare --attention "streaming,${FAMILIES// /,}" --decode-context 16k --device cuda \
    --out runs/families --no-progress > "$OUT/logs/compare.log" 2>&1 &
R="timeout $(( $(left) - 10 )) python3 scripts/recall_table.py --device cuda --dtype bfloat16"
$R --run runs/families/lolcats --cache 0,64,256 --keep 0 --select transfer \
    --passkey-lengths 1k,2k,4k,8k --multikey-lengths 1k,4k,8k --out "$OUT/recall.json" > "$OUT/logs/recall.log" 2>&1 &
$R --run runs/families/lolcats --keep 2,4,8,15,30 --select transfer,recall --passkey-lengths 1k,4k \
    --multikey-lengths 4k --multikey-keys 4 --trials 10 --out "$OUT/recall_layers.json" > "$OUT/logs/layers.log" 2>&1 &
for r in cache64 cache64-retr; do
    $R --run "runs/recall/$r" --keep 0 --select transfer --cache 64 --passkey-lengths 1k,2k,4k,8k \
        --multikey-lengths 1k,4k,8k --out "$OUT/recall_$r.json" > "$OUT/logs/recall_$r.log" 2>&1 &
done
wait
python3 scripts/families_table.py runs/families --out "$OUT/families.json" > "$OUT/logs/families_table.log" 2>&1
for f in runs/families/*/convert.json runs/recall/*/convert.json; do
    d=$(basename "$(dirname "$f")"); cp "$f" "$OUT/convert-$d.json"
done
cp runs/families/compare.json "$OUT/" 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
