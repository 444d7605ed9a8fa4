#!/bin/bash
# Prepares the GPU job (bench/gpu/job.sh) here, where Rust and nvcc are: the release binaries with
# CUDA (arqon, engine-bench, peer-check) and the load generator, the kernels' GPU test binaries,
# the OpenAI SDK the server tests use, and the peer script, all under .device/ (git-ignored).
# Then, with the device tool, send .device and run the job there in one call:
#   bash bench/gpu/pack.sh                      # here, ~10 min cold (candle's CUDA kernels), 1 min warm
#   run: bash .device/job.sh   carry: [".device"]   timeout_s: 600 (the job's deadline is 510 s)
# The job brings back $OUT/summary.txt and $OUT/results.tgz (every log and JSON), written again after
# each step, and prints the summary last.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
# shellcheck disable=SC1091
source ../shared/gpu/env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release -j 2 --features arqon-runtime/cuda,arqon-bench/cuda \
  -p arqon-runtime --bin arqon -p arqon-bench --bin engine-bench --bin peer-check
# The load generator has no CUDA code: the CPU build.
env -u CARGO_TARGET_DIR cargo build --release -j 2 -p arqon-bench --bin loadgen

mkdir -p .device/bin && rm -f .device/bin/*
for b in arqon engine-bench peer-check; do xz -6 -T2 -c "$CARGO_TARGET_DIR/release/$b" > ".device/bin/$b.xz"; done
xz -6 -c target/release/loadgen > .device/bin/loadgen.xz
bash kernels/scripts/gpu-check.sh pack
# The OpenAI SDK the server tests use (tests/server_openai.rs's version), for the GPU machine's Python
# (3.12, where this machine's may differ: pydantic-core and jiter are compiled per version; that
# machine has no internet). A dry run here can point the job at the host's copy with SDK_DIR.
sdk_py=${DEVICE_PYTHON:-3.12}
sdk=target/openai-sdk-py$sdk_py
openai=$(grep -o 'openai==[0-9][0-9.]*' tests/server_openai.rs | head -1)
if [ ! -d "$sdk" ]; then
  python3 -m pip install -q --no-compile --target "$sdk.tmp" --only-binary=:all: --python-version "$sdk_py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "$openai" && mv "$sdk.tmp" "$sdk"
fi
if [ -d "$sdk" ]; then
  tar -C "$sdk" -cJf .device/openai-sdk-py.tar.xz --transform 's,^\.,openai-sdk-py,' .
else
  rm -f .device/openai-sdk-py.tar.xz
  echo "note: no OpenAI SDK for Python $sdk_py (pip install failed); the job skips the SDK run"
fi
cp ../shared/gpu/peer_transformers.py bench/gpu/peer_reference.py bench/gpu/goals.py bench/gpu/job.sh .device/
du -sh .device
ls -la .device .device/bin
