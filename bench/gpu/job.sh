#!/bin/bash
# The GPU machine's whole job for the CUDA path, in one call (bench/gpu/pack.sh prepares .device/).
# Steps run in priority order, so that a short device session still answers the issue's goals first:
#   1. What the goals are read from:
#      - our kernels against their CPU references (the kernels' test binaries, CUDA tests only);
#      - a random-weight SmolLM2-shape checkpoint from peer_transformers.py --save, with transformers'
#        greedy decode speed on it (eager and static cache, batch 1 and 32, prompt 32, 128 new tokens);
#      - our fastest path on it: decode steps as CUDA graphs over the paged op (ARQON_CUDA_ATTENTION=paged
#        ARQON_CUDA_GRAPHS=on, the KV cache in bf16): its speed at batches 1-128 (engine_smollm2_graph) and
#        its logits and 32 greedy tokens against transformers' (peer_check_graph);
#      - the Llama-3.1-8B shape at batch 1: weight bytes read per second on cuBLAS (engine_8b) and on our
#        dense GEMV (engine_8b_gemv, ARQON_CUDA_DENSE_GEMV=warp_per_row_x4), next to the copy bandwidth.
#   2. Serving: `arqon serve --device cuda` driven by the OpenAI SDK (tests/openai_sdk/check.py, on the tiny
#      fixture, also with greedy ids and top-k candidates picked on the GPU, ARQON_CUDA_SAMPLING=device, and
#      next to the same server on the CPU), and by the load generator on the checkpoint.
#   3. The other paths, each next to step 1's: the ordinary eager step (peer_check, engine_smollm2); the
#      graphed step over an f32 cache (engine_smollm2_graph_f32kv) and on our dense GEMV for products of
#      1-32 rows (engine_smollm2_graph_gemv, peer_check_gemv); one ordinary step captured as it stands
#      (graph_probe); decode attention on our paged kernel without graphs (peer_check_paged,
#      engine_smollm2_paged); `arqon bench kernels` (every kernel variant at the checkpoint's shapes: this
#      SKU's kernel plan and report in $OUT/bench_kernels/, its `sampling` key our GPU picks against the
#      host's); a LoRA adapter on the tiny fixture next to the CPU; load runs with graphs, with sampling on
#      the GPU, and on a cache small enough to preempt.
# Each step has a time limit and the job a deadline (JOB_SECONDS, default 450): a step that would
# start past it is skipped and says so. Results go to $OUT; a summary table is printed last.
#   bash .device/job.sh                         # on the GPU machine
#   DEVICE=cpu bash .device/job.sh              # a dry run of the plumbing anywhere (no torch: the
#                                               # tiny fixture stands in for the checkpoint)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
OUT=${OUT:-/tmp/arqon-gpu-out}
DEVICE=${DEVICE:-cuda}
JOB_SECONDS=${JOB_SECONDS:-450}
mkdir -p "$OUT"
start=$(date +%s)
bin=/tmp/arqon-gpu-bin
mkdir -p "$bin"
summary=()
note() { summary+=("$1"); echo "== $1"; }
left() { echo $((JOB_SECONDS - ($(date +%s) - start))); }
# step NAME LIMIT_S CMD...: runs CMD with a time limit if the deadline allows, logging to $OUT/NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt 20 ]; then note "$name: skipped (job deadline)"; return 1; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $(($(date +%s) - t0)) s"
  return $rc
}

for z in "$here"/bin/*.xz; do xz -dc "$z" > "$bin/$(basename "$z" .xz)"; done
chmod +x "$bin"/*
{ nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || true; } | tee "$OUT/gpu.txt"
have_torch=0
python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null && have_torch=1

ckpt=/tmp/arqon-ckpt-smollm2
graphs=(env ARQON_CUDA_ATTENTION=paged ARQON_CUDA_GRAPHS=on)

# ---- 1. What the goals are read from. -------------------------------------------------------------
if [ "$DEVICE" = cuda ] && [ -d "$here/kernels" ]; then
  step kernels 150 env OUT="$OUT" bash "$here/kernels/gpu-check.sh" run
fi

# The checkpoint and transformers' speed on it.
if [ $have_torch = 1 ]; then
  rm -rf "$ckpt"
  step peer_smollm2 240 python3 "$here/peer_transformers.py" --shape smollm2-135m --batches 1,32 \
    --modes eager,static --runs 1 --save "$ckpt" --out "$OUT/peer_smollm2.json"
else
  note "peer: no torch+CUDA here; the tiny fixture stands in for the checkpoint"
  rm -rf "$ckpt" && cp -r "$root/tests/fixtures/tiny-llama" "$ckpt" && rm -f "$ckpt"/tokenizer*.json "$ckpt/chat_template.jinja"
fi
if [ -f "$ckpt/config.json" ]; then
  python3 "$here/peer_reference.py" tokenizer "$ckpt" > "$OUT/tokenizer.log" 2>&1
  # Transformers' logits and greedy tokens for a fixed input.
  if [ $have_torch = 1 ]; then
    step peer_reference 90 python3 "$here/peer_reference.py" reference "$ckpt" --prompt 32 --new 32 --out /tmp/arqon-ref.json
  else
    cp "$root/tests/fixtures/tiny-llama/reference.json" /tmp/arqon-ref.json
  fi
  # Our fastest path: the paged op's decode steps on fixed buffers, captured per batch bucket and replayed,
  # in bf16 throughout (--kv-cache-dtype auto keeps the model's bf16); its speed, logits and tokens.
  if [ "$DEVICE" = cuda ]; then
    step engine_smollm2_graph 150 "${graphs[@]}" "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --new-tokens 128 --batches 1,8,32,64,128 --reps 2 --json "$OUT/engine_smollm2_graph.json"
    [ -f /tmp/arqon-ref.json ] && step peer_check_graph 90 "${graphs[@]}" "$bin/peer-check" --model "$ckpt" \
      --reference /tmp/arqon-ref.json --device "$DEVICE" --json "$OUT/peer_check_graph.json"
  fi
fi

# The 8B shape at batch 1 (weights read per token = the bf16 parameter bytes).
if [ $have_torch = 1 ] && [ "$(left)" -gt 200 ]; then
  ck8=/tmp/arqon-ckpt-8b
  rm -rf "$ck8"
  step peer_8b 150 python3 "$here/peer_transformers.py" --shape llama-3.1-8b --batches 1 --modes static --runs 1 \
    --new 64 --save "$ck8" --out "$OUT/peer_8b.json"
  if [ -f "$ck8/config.json" ]; then
    python3 "$here/peer_reference.py" tokenizer "$ck8" > /dev/null
    step engine_8b 150 "$bin/engine-bench" --model "$ck8" --device "$DEVICE" --prompt-tokens 32 --new-tokens 64 \
      --batches 1 --reps 1 --no-prefill --json "$OUT/engine_8b.json"
    python3 - "$OUT" <<'PY' > "$OUT/copy_bandwidth.log" 2>&1 || true
import sys, time, torch
x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"copy bandwidth {2 * x.numel() / dt / 1e12:.2f} TB/s (read + write of 4 GiB)")
PY
    # The same decode with its 1-row products on our dense GEMV (four 16-byte chunks in flight per lane).
    step engine_8b_gemv 120 env ARQON_CUDA_DENSE_GEMV=warp_per_row_x4 "$bin/engine-bench" --model "$ck8" \
      --device "$DEVICE" --prompt-tokens 32 --new-tokens 64 --batches 1 --reps 1 --no-prefill \
      --json "$OUT/engine_8b_gemv.json"
  fi
  rm -rf "$ck8"  # 16 GB of disk back
else
  note "8b: skipped (no torch or under 200 s left)"
fi

# ---- 2. Serving. ----------------------------------------------------------------------------------
serve() { # serve NAME MODEL DEVICE: starts a server, sets $addr and $pid ($SERVE_KV: the cache's size flag)
  # shellcheck disable=SC2086
  "$bin/arqon" serve --model "$2" --device "$3" --served-model-name m --port 0 \
    ${SERVE_KV:---kv-cache-memory-fraction 0.5} > "$OUT/serve_$1.log" 2>&1 &
  pid=$!
  addr=""
  for _ in $(seq 1 240); do
    addr=$(grep -o 'listening on http://[0-9.:]*' "$OUT/serve_$1.log" | head -1 | sed 's/listening on //')
    [ -n "$addr" ] && curl -sf "$addr/ready" > /dev/null 2>&1 && return 0
    kill -0 $pid 2> /dev/null || return 1
    sleep 0.5
  done
  return 1
}
sdk_cfg='{"prompt": "The capital of France is", "question": "What is the capital of France?", "max_tokens": 12, "stop": ["."]}'
if [ -f "$here/openai-sdk-py.tar.xz" ]; then
  tar -C /tmp -xJf "$here/openai-sdk-py.tar.xz"
  # DEVICE:SAMPLING: on CUDA also with greedy ids and top-k candidates picked on the GPU (ARQON_CUDA_SAMPLING=device).
  runs=("$DEVICE:")
  [ "$DEVICE" = cuda ] && runs+=("cuda:device")
  runs+=("cpu:")
  for run in "${runs[@]}"; do
    dev=${run%%:*} sampling=${run#*:}
    name=sdk_$dev${sampling:+_$sampling}
    if ARQON_CUDA_SAMPLING=$sampling serve "$name" "$root/tests/fixtures/tiny-llama" "$dev"; then
      PYTHONPATH=/tmp/openai-sdk-py step "$name" 90 python3 "$root/tests/openai_sdk/check.py" "$addr" m "$sdk_cfg"
      cp "$OUT/$name.log" "$OUT/$name.json"
      curl -s "$addr/metrics" > "$OUT/metrics_$name.txt"
    else
      note "$name: the server did not become ready (serve_$name.log)"
    fi
    kill $pid 2> /dev/null; wait $pid 2> /dev/null
    [ "$dev" = cpu ] && break
  done
  python3 - "$OUT" <<'PY' || true
import glob, json, os, sys
out = sys.argv[1]
try:
    b = json.load(open(f"{out}/sdk_cpu.json"))
except Exception as e:
    print(f"sdk comparison: {e}"); sys.exit()
for f in sorted(glob.glob(f"{out}/sdk_*.json")):
    run = os.path.basename(f)[4:-5]
    if run == "cpu":
        continue
    try:
        a = json.load(open(f))
    except Exception as e:
        print(f"sdk {run}: {e}"); continue
    same = [k for k in a if a.get(k) == b.get(k)]
    print(f"sdk {run}: {len(a)} calls answered; identical to the CPU server's: {len(same)} ({', '.join(same)})")
PY
fi
if [ -f "$ckpt/config.json" ] && serve load "$ckpt" "$DEVICE"; then
  step loadgen 120 "$bin/loadgen" --url "$addr" --model m --concurrency 1,8,32 --requests 32 --max-tokens 64 \
    --json "$OUT/loadgen.json"
  curl -s "$addr/metrics" > "$OUT/metrics_load.txt"
  kill $pid 2> /dev/null; wait $pid 2> /dev/null
fi

# ---- 3. The other paths, each next to step 1's. ----------------------------------------------------
if [ -f "$ckpt/config.json" ]; then
  # The ordinary (eager) step: logits and tokens, and speed.
  [ -f /tmp/arqon-ref.json ] && step peer_check 120 "$bin/peer-check" --model "$ckpt" --reference /tmp/arqon-ref.json \
    --device "$DEVICE" --json "$OUT/peer_check.json"
  step engine_smollm2 180 "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" --prompt-tokens 32 --new-tokens 128 \
    --batches 1,8,32,64,128 --reps 2 --json "$OUT/engine_smollm2.json"
  if [ "$DEVICE" = cuda ]; then
    # The graphed step over an f32 cache (f32 activations, bf16 products converted around each).
    step engine_smollm2_graph_f32kv 75 "${graphs[@]}" "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --kv-cache-dtype f32 --prompt-tokens 32 --new-tokens 128 --batches 1,32 --reps 1 \
      --json "$OUT/engine_smollm2_graph_f32kv.json"
    # The graphed steps with their products of 1-32 rows on our dense GEMV (ARQON_CUDA_DENSE_GEMV), not
    # cuBLAS: its speed next to engine_smollm2_graph's batches 1, 8 and 32, and its logits and tokens.
    gemv=("${graphs[@]}" ARQON_CUDA_DENSE_GEMV=warp_per_row)
    step engine_smollm2_graph_gemv 60 "${gemv[@]}" "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --new-tokens 128 --batches 1,8,32 --reps 2 --json "$OUT/engine_smollm2_graph_gemv.json"
    [ -f /tmp/arqon-ref.json ] && step peer_check_gemv 60 "${gemv[@]}" "$bin/peer-check" --model "$ckpt" \
      --reference /tmp/arqon-ref.json --device "$DEVICE" --json "$OUT/peer_check_gemv.json"
    # One decode step of the ordinary path captured as it stands and replayed, next to the eager step.
    step graph_probe 45 "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --graph-probe --batches 1,8,32 --reps 20 --json "$OUT/graph_probe.json"
    # Decode attention on our paged_attention kernel without graphs.
    [ -f /tmp/arqon-ref.json ] && ARQON_CUDA_ATTENTION=paged step peer_check_paged 120 "$bin/peer-check" \
      --model "$ckpt" --reference /tmp/arqon-ref.json --device "$DEVICE" --json "$OUT/peer_check_paged.json"
    ARQON_CUDA_ATTENTION=paged step engine_smollm2_paged 180 "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --new-tokens 128 --batches 1,8,32,64,128 --reps 2 --json "$OUT/engine_smollm2_paged.json"
  fi
  # This SKU's kernel plan: every variant of every kernel at the checkpoint's shapes.
  step bench_kernels 90 "$bin/arqon" bench kernels --model "$ckpt" --device "$DEVICE" --min-ms 10 \
    --out "$OUT/bench_kernels"
fi
# LoRA on the device: the tiny fixture's adapter applied per request and merged, next to the CPU.
lora() { # lora NAME DEVICE [--merge]
  step "lora_$1" 60 "$bin/arqon" generate --model "$root/tests/fixtures/tiny-llama" --device "$2" \
    --adapter "$root/tests/fixtures/tiny-lora" --prompt "the quick brown fox" --max-tokens 24 "${@:3}"
}
for mode in apply merge; do
  flag=(); [ $mode = merge ] && flag=(--merge)
  lora "${DEVICE}_$mode" "$DEVICE" "${flag[@]}"
  if [ "$DEVICE" != cpu ]; then
    lora "cpu_$mode" cpu "${flag[@]}"
    # The text, less the timing line on stderr (it follows the text on its last line).
    text() { sed 's/arqon: prefill .*$//' "$OUT/lora_$1.log" 2> /dev/null; }
    a=$(text "${DEVICE}_$mode") b=$(text "cpu_$mode")
    if [ -n "$a" ] && [ "$a" = "$b" ]; then note "lora $mode: same text as the CPU"; else note "lora $mode: differs from the CPU"; fi
  fi
done
if [ -f "$ckpt/config.json" ]; then
  # The same load with decode steps as CUDA graphs on the paged op: the server's steps by path.
  if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 240 ] && ARQON_CUDA_ATTENTION=paged ARQON_CUDA_GRAPHS=on \
    serve load_graph "$ckpt" cuda; then
    step loadgen_graph 120 "$bin/loadgen" --url "$addr" --model m --concurrency 1,8,32 --requests 32 \
      --max-tokens 64 --json "$OUT/loadgen_graph.json"
    curl -s "$addr/metrics" | grep -E '^arqon_engine_steps_total' > "$OUT/metrics_graph.txt"
    kill $pid 2> /dev/null; wait $pid 2> /dev/null
  fi
  # The same load with greedy ids picked on the GPU (only ids cross to the host, not logits).
  if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 240 ] && ARQON_CUDA_SAMPLING=device serve load_device "$ckpt" cuda; then
    step loadgen_device 120 "$bin/loadgen" --url "$addr" --model m --concurrency 1,8,32 --requests 32 \
      --max-tokens 64 --json "$OUT/loadgen_device.json"
    kill $pid 2> /dev/null; wait $pid 2> /dev/null
  fi
  # Preemption on the device: a 32 MiB cache (45 blocks of this shape) under 32 clients that
  # would hold 192: sequences are preempted and compute their tokens again row by row.
  if [ "$(left)" -gt 200 ] && SERVE_KV="--kv-cache-mb 32" serve preempt "$ckpt" "$DEVICE"; then
    step loadgen_preempt 120 "$bin/loadgen" --url "$addr" --model m --concurrency 32 --requests 64 \
      --max-tokens 64 --json "$OUT/loadgen_preempt.json"
    curl -s "$addr/metrics" | grep -E '^arqon_(preemptions_total|generation_tokens_total|requests_total)' \
      > "$OUT/metrics_preempt.txt"
    kill $pid 2> /dev/null; wait $pid 2> /dev/null
  fi
fi

echo
echo "## summary ($(($(date +%s) - start)) s)"
cat "$OUT/gpu.txt" 2> /dev/null
printf '%s\n' "${summary[@]}"
for f in kernels peer_check peer_check_paged peer_check_graph peer_check_gemv engine_smollm2 engine_smollm2_graph \
  engine_smollm2_graph_f32kv engine_smollm2_graph_gemv graph_probe \
  engine_smollm2_paged engine_8b engine_8b_gemv loadgen loadgen_graph loadgen_device \
  loadgen_preempt copy_bandwidth; do
  [ -f "$OUT/$f.log" ] && { echo "### $f"; grep -E '^\||test result|TB/s|decode graphs|KV cache|FAILED|panicked|error' "$OUT/$f.log" | awk '!seen[$0]++' | head -24; }
done
for f in peer_smollm2 peer_8b; do [ -f "$OUT/$f.log" ] && { echo "### $f"; grep -E '^(eager|static)' "$OUT/$f.log"; }; done
[ -f "$OUT/metrics_preempt.txt" ] && { echo "### preemption"; cat "$OUT/metrics_preempt.txt"; }
[ -f "$OUT/metrics_graph.txt" ] && { echo "### serving steps with graphs on"; cat "$OUT/metrics_graph.txt"; }
[ -f "$OUT/bench_kernels/summary.md" ] && { echo "### kernel plan"; grep -E '^(Plan|\|)' "$OUT/bench_kernels/summary.md"; }
exit 0
