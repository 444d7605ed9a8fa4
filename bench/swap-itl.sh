#!/usr/bin/env bash
# Inter-token latency with and without live variant swaps, same server, same run.
#   bash bench/swap-itl.sh
# Builds a catalog of the default model with two entries of identical speed (the shipped
# Q4_1 base and a twin entry on the same artifact), so any ITL difference is the swap's
# own cost, not a slower variant's. Starts `arqon serve --catalog` (staging scope, a one-step
# canary, 100 ms telemetry windows), runs `loadgen` (closed loop, CONCURRENCY streams,
# REQUESTS requests of MAX_TOKENS tokens) once quietly and once while a loop activates
# the other variant every SWAP_EVERY_S seconds through the admin API. Results:
# bench/runs/<date>-<sku>-swap/{quiet,swapping}.json and summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
CONCURRENCY=${CONCURRENCY:-8}
REQUESTS=${REQUESTS:-48}
MAX_TOKENS=${MAX_TOKENS:-48}
SWAP_EVERY_S=${SWAP_EVERY_S:-0.25}
PORT=${PORT:-18095}
TOKEN=bench-admin

cargo build --release -q -p arqon-runtime --bin arqon -p arqon-bench --bin loadgen
CAT=$(mktemp -d)
SERVER_PID=
trap 'kill $SERVER_PID 2>/dev/null || true; rm -rf "$CAT"' EXIT

./target/release/arqon variants build --out "$CAT" --formats q4_1 --target-tokens 4 --floor 0 >/dev/null
SKU=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sku"])' "$CAT/catalog.json")
OUT=bench/runs/$(date +%Y-%m-%d)-$SKU-swap
mkdir -p "$OUT"
python3 - "$CAT/catalog.json" <<'PY'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
twin = dict(next(v for v in c["variants"] if v["id"] == "q4_1"), id="q4_1-twin")
c["variants"].append(twin)
json.dump(c, open(p, "w"), indent=2)
PY

./target/release/arqon serve --catalog "$CAT" --served-model-name smol --port "$PORT" \
    --admin-token $TOKEN --tuner-scope staging --canary-steps 1000 --canary-min-windows 1 \
    --canary-min-samples 0 --telemetry-window-ms 100 --slo-itl-p99-ms 600000 \
    --slo-ttft-p99-ms 600000 >"$OUT/serve.log" 2>&1 &
SERVER_PID=$!
until curl -sf -o /dev/null "http://127.0.0.1:$PORT/ready"; do sleep 0.2; done
activate() {
    curl -s -o /dev/null -X POST -H "authorization: Bearer $TOKEN" -d '{"wait_s": 5}' \
        "http://127.0.0.1:$PORT/admin/variants/$1/activate"
}
# Load the twin once before measuring (both variants resident, as in steady state).
sleep 1
activate q4_1-twin
activate q4_1

load() {
    ./target/release/loadgen --url "http://127.0.0.1:$PORT" --model smol --concurrency "$CONCURRENCY" \
        --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" --label "$1" --json "$OUT/$1.json" | tee -a "$OUT/summary.txt"
}
load quiet
SWAPS=0
(
    i=0
    while true; do
        activate "$([ $((i % 2)) = 0 ] && echo q4_1-twin || echo q4_1)"
        i=$((i + 1))
        sleep "$SWAP_EVERY_S"
    done
) &
SWAPPER=$!
load swapping
kill $SWAPPER
SWAPS=$(curl -s -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/admin/executor" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["counters"]["promotions"])')
python3 - "$OUT" "$SWAPS" <<'PY'
import json, sys
out, swaps = sys.argv[1], sys.argv[2]
rows = []
for name in ("quiet", "swapping"):
    lvl = json.load(open(f"{out}/{name}.json"))["levels"][0]
    rows.append((name, lvl["itl_ms"]["p50"], lvl["itl_ms"]["p99"], lvl["itl_ms"]["max"], lvl["output_tokens_per_s"], sum(lvl["errors"].values())))
with open(f"{out}/summary.md", "w") as f:
    f.write(f"# ITL during live swaps ({swaps} promotions while loading)\n\n")
    f.write("| run | ITL p50 ms | ITL p99 ms | ITL max ms | output tok/s | failed |\n|---|---|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]} |\n")
    f.write(f"\np99 ratio swapping/quiet: {rows[1][2] / rows[0][2]:.2f}\n")
print(open(f"{out}/summary.md").read())
PY
