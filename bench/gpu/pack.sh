#!/bin/bash
# Prepares the GPU job (bench/gpu/job.sh) here, where Rust and nvcc are: the release binaries with
# CUDA (arqon, engine-bench, peer-check) and the load generator, the kernels' GPU test binaries,
# the OpenAI SDK the server tests use, and the peer script, all under .device/ (git-ignored).
# Then, with the device tool, send .device and run the job there in one call:
#   bash bench/gpu/pack.sh                      # here, ~10 min cold (candle's CUDA kernels), 1 min warm
#   run: bash .device/job.sh   carry: [".device"]   timeout: leave a rerun's worth of device time
# The job writes everything under $OUT and prints a summary table last.
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
# The OpenAI SDK (pip-installed by tests/server_openai.rs; the GPU machine has no internet).
if [ -d target/openai-sdk-py ]; then
  tar -C target -cJf .device/openai-sdk-py.tar.xz openai-sdk-py
else
  echo "note: target/openai-sdk-py is missing (run cargo test --test server_openai once); the job skips the SDK run"
fi
cp ../shared/gpu/peer_transformers.py bench/gpu/peer_reference.py bench/gpu/job.sh .device/
du -sh .device
ls -la .device .device/bin
