#!/bin/bash
# usage: ab.sh BINARY LABEL PORT  (default cache: no preemption)
set -e
OUT=${OUT:-.}
BIN=$1; LABEL=$2; PORT=$3
$BIN serve --port $PORT --served-model-name m > /dev/null 2>&1 &
PID=$!
for i in $(seq 1 120); do curl -sf localhost:$PORT/ready >/dev/null && break; sleep 1; done
./target/release/loadgen --url http://127.0.0.1:$PORT --model m --label $LABEL --concurrency 1,8 --requests 16 --warmup 1 \
  --max-tokens 64 --json $OUT/ab-$LABEL.json > $OUT/ab-$LABEL.txt 2>&1 || true
curl -s localhost:$PORT/metrics | grep -E "^arqon_preemptions_total " >> $OUT/ab-$LABEL.txt || true
kill $PID; wait $PID || true
