# Sourced by the GPU session scripts (scripts/gpu_*_session.sh), from the repository root on the device machine:
# checks OUT and KIT, installs KIT/whl/*.whl into /tmp/site, sets PYTHONPATH, defines elapsed and step, and prints
# the card and the versions that matter.
set -u
OUT=${OUT:?set OUT}
KIT=${KIT:?set KIT}
mkdir -p "$OUT" /tmp/site /tmp/kit
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$KIT"/whl/*.whl > /tmp/install.log 2>&1 || { echo "install failed"; tail -5 /tmp/install.log; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
elapsed() { echo $(( $(date +%s) - T0 )); }
step() {  # step NAME LIMIT CMD...: run with a time limit, log to $OUT/NAME.log, one line of outcome
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: rc $? at $(elapsed) s; $(tail -1 "$OUT/$name.log" | cut -c1-300)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
