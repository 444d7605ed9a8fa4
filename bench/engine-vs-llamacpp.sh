#!/usr/bin/env bash
# Engine speed, Arqon vs llama.cpp, on the same GGUF file in the same run.
#   bash bench/engine-vs-llamacpp.sh [MODEL]   (default: the default model)
# Builds llama-cpp-python 0.3.36 from source into $LLAMA_VENV once (~10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
LLAMA_VENV=${LLAMA_VENV:-$HOME/.cache/arqon/llama-venv}
if [ ! -x "$LLAMA_VENV/bin/python" ] || ! "$LLAMA_VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    python3 -m venv "$LLAMA_VENV"
    # This CPU's SIMD features, one by one, but never AMX: with GGML_NATIVE=ON
    # llama.cpp's AMX matmul segfaulted on the AVX-512 VM these figures come from.
    # LLAMA_CMAKE_ARGS overrides the choice.
    flags="-DGGML_NATIVE=OFF"
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
        avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        if grep -qw "${pair%%:*}" /proc/cpuinfo; then flags="$flags -DGGML_${pair##*:}=ON"; fi
    done
    CMAKE_ARGS="${LLAMA_CMAKE_ARGS:-$flags}" CMAKE_BUILD_PARALLEL_LEVEL=$THREADS \
        "$LLAMA_VENV/bin/pip" install -q llama-cpp-python==0.3.36 numpy
fi
cargo build --release -q -p arqon-runtime -p arqon-bench
MODEL=$(./target/release/arqon fetch --model "${1:-smollm2-135m-instruct}")
SKU=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //; s/[^A-Za-z0-9]\+/-/g; s/-$//')
OUT=${OUT_DIR:-bench/runs/$(date +%Y-%m-%d)-cpu-$SKU}
mkdir -p "$OUT"
RAYON_NUM_THREADS=$THREADS ./target/release/engine-bench --model "$MODEL" --json "$OUT/engine-arqon.json"
"$LLAMA_VENV/bin/python" bench/peer_llamacpp.py --model "$MODEL" --threads "$THREADS" --json "$OUT/engine-llamacpp.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
a = json.load(open(f"{out}/engine-arqon.json")); l = json.load(open(f"{out}/engine-llamacpp.json"))
lines = ["| metric | batch | arqon tok/s | llama.cpp tok/s | arqon/llama.cpp |", "|---|---|---|---|---|"]
# By (metric, batch): engine-bench also has `generate` rows (prefill included), which the peer lacks.
peer = {(r["metric"], r["batch"]): r for r in l["rows"]}
for ra, rl in ((r, peer[(r["metric"], r["batch"])]) for r in a["rows"] if (r["metric"], r["batch"]) in peer):
    lines.append(f"| {ra['metric']} | {ra['batch']} | {ra['tokens_per_s']:.1f} | {rl['tokens_per_s']:.1f} | {ra['tokens_per_s']/rl['tokens_per_s']:.2f} |")
text = "\n".join(lines)
print(text)
open(f"{out}/engine-summary.md", "w").write(f"# Engine speed, {a['threads']} threads\n\nModel: {a['model']}\n\n{text}\n")
PY
