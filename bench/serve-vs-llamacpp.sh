#!/usr/bin/env bash
# Serving speed, `arqon serve` vs llama.cpp's two servers, same GGUF, CPU, same run.
#   bash bench/serve-vs-llamacpp.sh [MODEL_NAME]   (default: the default model)
# One server at a time on a loopback port, THREADS threads each; `loadgen` streams
# /v1/completions at concurrency 1, 4 and 16 (REQUESTS requests per level, MAX_TOKENS
# tokens each), then the server is stopped. Results: bench/runs/<date>-cpu-<sku>/serve-*.json
# and serve-summary.md. About 6 minutes on 2 idle cores; no level starts requests after
# LEVEL_TIMEOUT_S, so a slow server shows up as "unsent" rather than an endless run.
#
# Servers:
#   arqon        ./target/release/arqon serve                       (RAYON_NUM_THREADS=THREADS)
#   llama-server llama.cpp's C++ server from the llama-cpp-python 0.3.36 sdist
#                (bench/build-llama-server.sh), -np 16 -fa off -c 16384
#   llama-python python -m llama_cpp.server --interrupt_requests False (its default cuts
#                concurrent streams short) from $LLAMA_VENV (llama-cpp-python[server]==0.3.36)
# Set SERVERS="llama-server arqon" to run a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
REQUESTS=${REQUESTS:-48}
LEVEL_TIMEOUT_S=${LEVEL_TIMEOUT_S:-90}
MAX_TOKENS=${MAX_TOKENS:-64}
LEVELS=${LEVELS:-1,4,16}
SERVERS=${SERVERS:-"llama-server llama-python arqon"}
LLAMA_VENV=${LLAMA_VENV:-/tmp/llvenv}
PORT=${PORT:-18090}
ALIAS=smollm2
READY_TIMEOUT_S=180

cargo build --release -q -p arqon-bench --bin loadgen
case " $SERVERS " in *" arqon "*) cargo build --release -q -p arqon-runtime --bin arqon ;; esac
MODEL=${MODEL_PATH:-$(./target/release/arqon fetch --model "${1:-smollm2-135m-instruct}")}
SKU=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //; s/[^A-Za-z0-9]\+/-/g; s/-$//')
OUT=${OUT_DIR:-bench/runs/$(date +%Y-%m-%d)-cpu-$SKU}
mkdir -p "$OUT"

# llama-cpp-python has no `ignore_eos`; banning the model's end-of-generation tokens with
# logit_bias does the same at temperature 0, so every server streams the full MAX_TOKENS.
EOG_TOKENS=$("$LLAMA_VENV/bin/python" - "$MODEL" 2>/dev/null <<'PY'
import sys, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], verbose=False, vocab_only=True)
vocab = llama_cpp.llama_model_get_vocab(m._model.model)
print(",".join(str(i) for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)))
PY
)

SERVER_PID=
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
}
trap stop_server EXIT

# start_server NAME -> sets SERVER_PID and READY_PATH; the server logs to $OUT/serve-NAME.log.
start_server() {
    local name=$1 log=$OUT/serve-$1.log
    case $name in
    arqon)
        RAYON_NUM_THREADS=$THREADS ./target/release/arqon serve --model "$MODEL" \
            --served-model-name $ALIAS --host 127.0.0.1 --port "$PORT" >"$log" 2>&1 &
        READY_PATH=/ready ;;
    llama-server)
        local bin; bin=$(bash bench/build-llama-server.sh)
        "$bin" -m "$MODEL" -t "$THREADS" -np 16 -fa off -c 16384 --alias $ALIAS \
            --host 127.0.0.1 --port "$PORT" >"$log" 2>&1 &
        READY_PATH=/health ;;
    llama-python)
        "$LLAMA_VENV/bin/python" -m llama_cpp.server --model "$MODEL" --model_alias $ALIAS \
            --n_threads "$THREADS" --n_threads_batch "$THREADS" --interrupt_requests False \
            --host 127.0.0.1 --port "$PORT" >"$log" 2>&1 &
        READY_PATH=/v1/models ;;
    *) echo "unknown server $name" >&2; return 1 ;;
    esac
    SERVER_PID=$!
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until curl -sf -o /dev/null "http://127.0.0.1:$PORT$READY_PATH"; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "$name did not become ready; see $log" >&2; tail -5 "$log" >&2; return 1
        fi
        sleep 0.5
    done
}

{
    echo "# Setup"
    echo "date: $(date -Is)"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- runtime kernels bench || echo ' (dirty)')"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'), $(nproc) cores; threads per server: $THREADS"
    echo "model: $MODEL"
    echo "load: $REQUESTS requests per level (none started after ${LEVEL_TIMEOUT_S}s), closed loop at $LEVELS, $MAX_TOKENS tokens, temperature 0, ignore_eos (llama-python: logit_bias -100 on EOG tokens $EOG_TOKENS)"
} >"$OUT/serve-setup.txt"

for name in $SERVERS; do
    echo "== $name" >&2
    start_server "$name"
    echo "$name: load before $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/serve-setup.txt"
    # llama-cpp-python ignores unknown fields (ignore_eos); it gets the EOG ban instead.
    extra=()
    if [ "$name" = llama-python ] && [ -n "$EOG_TOKENS" ]; then extra=(--ban-tokens "$EOG_TOKENS"); fi
    ./target/release/loadgen "${extra[@]}" --url "http://127.0.0.1:$PORT" --model $ALIAS --label "$name" \
        --concurrency "$LEVELS" --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --warmup 2 \
        --request-timeout-s 120 --level-timeout-s "$LEVEL_TIMEOUT_S" --json "$OUT/serve-$name.json" \
        >"$OUT/serve-$name.md"
    echo "$name: load after $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/serve-setup.txt"
    stop_server
done

python3 - "$OUT" $SERVERS <<'PY'
import json, os, sys
out, names = sys.argv[1], sys.argv[2:]
runs = {n: json.load(open(f"{out}/serve-{n}.json")) for n in names if os.path.exists(f"{out}/serve-{n}.json")}
metrics = [("out tok/s", lambda l: l["output_tokens_per_s"], "{:.1f}", True),
           ("req/s", lambda l: l["requests_per_s"], "{:.2f}", True),
           ("TTFT p50 ms", lambda l: l["ttft_ms"]["p50"], "{:.1f}", False),
           ("TTFT p99 ms", lambda l: l["ttft_ms"]["p99"], "{:.1f}", False),
           ("ITL p50 ms", lambda l: l["itl_ms"]["p50"], "{:.1f}", False),
           ("ITL p99 ms", lambda l: l["itl_ms"]["p99"], "{:.1f}", False),
           ("errors", lambda l: l["failed"], "{}", None),
           ("tok/req mean", lambda l: l["tokens_per_request"]["mean"], "{:.1f}", True)]
cols = [n for n in names if n in runs]
ratio = "arqon" in runs and "llama-server" in runs
head = "| concurrency | metric | " + " | ".join(cols) + (" | arqon / llama-server |" if ratio else " |")
lines = [head, "|" + "---|" * (head.count("|") - 1)]
levels = sorted({l["level"] for r in runs.values() for l in r["levels"]})
def fmt(fmt_s, v): return "-" if v is None else fmt_s.format(v)
for level in levels:
    by = {n: next((l for l in runs[n]["levels"] if l["level"] == level), None) for n in cols}
    for name, get, f, has_ratio in metrics:
        vals = {n: (get(by[n]) if by[n] else None) for n in cols}
        row = f"| {level:g} | {name} | " + " | ".join(fmt(f, vals[n]) for n in cols)
        if ratio:
            a, l = vals["arqon"], vals["llama-server"]
            ok = has_ratio is not None and a is not None and l not in (None, 0)
            row += " | " + (f"{a / l:.2f}" if ok else "-")
        lines.append(row + " |")
table = "\n".join(lines)
print(table)
setup = open(f"{out}/serve-setup.txt").read()
per_server = "\n\n".join(f"## {n}\n\n" + open(f"{out}/serve-{n}.md").read().strip() for n in cols)
open(f"{out}/serve-summary.md", "w").write(
    "# Serving speed: arqon serve vs llama.cpp (CPU)\n\n"
    "Command: `bash bench/serve-vs-llamacpp.sh`\n\n"
    "Higher is better for tok/s, req/s; lower for latencies. Ratios above 1 favour arqon for "
    "throughput, below 1 for latency. A request that streams fewer tokens than asked is an error.\n\n"
    f"{table}\n\n```\n{setup}```\n\n{per_server}\n")
PY
echo "wrote $OUT/serve-summary.md" >&2
