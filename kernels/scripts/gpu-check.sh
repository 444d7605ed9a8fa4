#!/bin/bash
# The GPU half of the kernels' tests, in two steps (the GPU machine has no Rust):
#   bash kernels/scripts/gpu-check.sh pack   # here: nvcc + cargo build the test binaries into .device/kernels/
#   bash .device/kernels/gpu-check.sh run    # there (send .device): runs them (less the emulated
#                                            # backend's), fails if a CUDA test skipped
# `run` writes the logs to $OUT (or /tmp) and prints a one-line summary per binary last.
set -euo pipefail
case "${1:-}" in
pack)
  cd "$(git rev-parse --show-toplevel)"
  # shellcheck disable=SC1091
  source ../shared/gpu/env.sh
  mkdir -p .device/kernels && rm -f .device/kernels/*
  cargo test -p arqon-kernels --features cuda --release --no-run -j 2 --message-format=json 2>/dev/null |
    python3 -c 'import sys,json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable"): print(m["executable"])' |
    while read -r exe; do xz -6 -c "$exe" > ".device/kernels/$(basename "$exe" | sed 's/-[0-9a-f]*$//').xz"; done
  cp kernels/scripts/gpu-check.sh .device/kernels/
  ls -la .device/kernels
  ;;
run)
  dir=$(cd "$(dirname "$0")" && pwd)
  out=${OUT:-/tmp}
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
  status=0
  summary=()
  for z in "$dir"/*.xz; do
    name=$(basename "$z" .xz)
    xz -dc "$z" > "/tmp/$name" && chmod +x "/tmp/$name"
    # The emulated backend ran where the binary was built (its modules live there): the GPU's tests only.
    if ! "/tmp/$name" --test-threads 4 --nocapture --skip emulated > "$out/$name.log" 2>&1; then status=1; fi
    if grep -q "skipped .* on cuda" "$out/$name.log"; then echo "$name: a CUDA test skipped"; status=1; fi
    summary+=("$name: $(grep -E '^test result' "$out/$name.log" | tail -1)")
  done
  grep -h -E "FAILED|panicked" "$out"/*.log | head -20 || true
  printf '%s\n' "${summary[@]}"
  exit $status
  ;;
*) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
