#!/usr/bin/env bash
# bench/pretrain_gpu.py on the device machine (one H100 or H200): nanoGPT, forge gpt2 and forge
# modern at 124M on the demo's ~13M tokens; the table goes to the output, the JSON and the log
# to $OUT. That machine has python3 3.12 with torch 2.11, numpy, tiktoken and PyYAML, but not
# pydantic (nor the rest of what forge's imports need), and it reaches no network, so the
# wheels and the dataset travel with the working tree (both are git-ignored).
#
# 1. Here, once, in the repository root (minutes; the wheels are the versions .venv runs):
#        bash bench/device_pretrain_gpu.sh prepare
#    which downloads the cp312 wheels into .whl/ and, unless it exists, builds the demo's
#    dataset (.venv/bin/forge prepare --config configs/demo.yaml ->
#    runs/demo/tokenize/dataset.zarr: 12.9M train and 0.2M val tokens in 15 + 1 shards, 26 MB;
#    with the 8 MB of wheels and the tree about 36 MB travel, under the 64 MiB limit).
# 2. The device tool's run, about 6 minutes on an H100 (the script stops the bench at 500 s):
#        command:   bash bench/device_pretrain_gpu.sh
#        carry:     [".whl", "runs/demo/tokenize/dataset.zarr"]
#        timeout_s: 590
#    Extra arguments go to bench/pretrain_gpu.py (e.g. --sides gpt2,modern --tokens 6000000).
#    Copy the returned pretrain_gpu.json into bench/results/ and name the card in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=runs/demo/tokenize/dataset.zarr
# what forge's imports need beyond the device's packages (typing-extensions: pydantic needs
# 4.16, newer than the image may hold)
WHEELS="pydantic pydantic-core annotated-types typing-inspection typing-extensions zstandard dill"

if [ "${1:-}" = prepare ]; then
    pins=$(.venv/bin/python -c "import sys; from importlib.metadata import version as v; \
print(' '.join(f'{n}=={v(n)}' for n in sys.argv[1:]))" $WHEELS)
    rm -rf .whl && mkdir .whl
    # shellcheck disable=SC2086  # one argument per pin
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl $pins
    [ -e "$DATASET/zarr.json" ] || .venv/bin/forge prepare --config configs/demo.yaml
    du -sh .whl "$DATASET"
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 500 python3 bench/pretrain_gpu.py --dataset "$DATASET" --out "$OUT/pretrain_gpu.json" \
    "$@" 2>&1 | tee "$OUT/pretrain_gpu.log"
