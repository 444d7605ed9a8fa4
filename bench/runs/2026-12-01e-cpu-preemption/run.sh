#!/bin/bash
# usage: run.sh BINARY LABEL PORT
set -e
OUT=${OUT:-.}
BIN=$1; LABEL=$2; PORT=$3
$BIN serve --port $PORT --served-model-name m --kv-cache-mb 96 > /dev/null 2>&1 &
PID=$!
for i in $(seq 1 120); do curl -sf localhost:$PORT/ready >/dev/null && break; sleep 1; done
./target/release/loadgen --url http://127.0.0.1:$PORT --model m --label $LABEL --endpoint chat --concurrency 8 --requests 24 --warmup 1 \
  --max-tokens 512 --no-ignore-eos --allow-early-stop --prompt "$PROMPT" --json $OUT/out-$LABEL.json > $OUT/table-$LABEL.txt 2>&1 || true
curl -s localhost:$PORT/metrics | grep -E "^arqon_(preemptions_total|generation_tokens_total|prompt_tokens_total|kv_cache_blocks_total) " > $OUT/metrics-$LABEL.txt
kill $PID; wait $PID || true
