#!/usr/bin/env bash
# The GPU run behind docs/results/families.json (issue 16), in one command on one H100/H200 with the bundled model
# and data installed; about 5 minutes. Run from the repository root:
#
#     OUT=runs/gpu-session bash scripts/gpu/gpu_session.sh
#
# One `linearize compare` per attention family, all at once (the GPU has room for five 135M conversions): each
# converts at the default budget (bfloat16 teacher) and measures its student; scripts/families_table.py joins them.
# Each compare's output goes to $OUT/logs; the JSON results to $OUT.
set -u
cd "$(dirname "$0")/../.."  # the repository root
OUT=${OUT:-runs/gpu-session}
LIMIT=${LIMIT:-270}  # seconds for every compare
mkdir -p "$OUT/logs"
T0=$(date +%s)
FAMILIES="streaming lolcats transnormer transnormer-norm nalaformer"
for f in $FAMILIES; do
    (timeout "$LIMIT" python3 -m linearize.cli compare --attention "$f" --decode-context 16k --device cuda \
        --out "runs/families/$f" --no-progress > "$OUT/logs/compare-$f.log" 2>&1
     echo "compare $f: rc $? at $(( $(date +%s) - T0 )) s") &
done
wait
dirs=$(for f in $FAMILIES; do [ -f "runs/families/$f/compare.json" ] && echo "runs/families/$f"; done)
python3 scripts/families_table.py $dirs --out "$OUT/families.json" 2>&1 | tail -8
for f in $FAMILIES; do cp "runs/families/$f/compare.json" "$OUT/compare-$f.json" 2>/dev/null
    cp "runs/families/$f/$f/convert.json" "$OUT/convert-$f.json" 2>/dev/null; done
echo "total $(( $(date +%s) - T0 )) s"
