#!/bin/bash
# The GPU machine's whole job for the CUDA path, in one call (bench/gpu/pack.sh prepares .device/).
# Steps run in priority order, so that a short device session still answers the issue's goals first:
#   1. The goals:
#      - a random-weight SmolLM2-shape checkpoint, made on the GPU in bf16 (peer_reference.py checkpoint);
#      - our fastest path on it: decode steps as CUDA graphs over the paged op (ARQON_CUDA_ATTENTION=paged
#        ARQON_CUDA_GRAPHS=on, the KV cache in bf16), its speed at batches 1 and 32 (engine_smollm2_graph),
#        then its logits and 32 greedy tokens against transformers' (peer_reference, peer_check_graph);
#      - the copy bandwidth, and the Llama-3.1-8B shape at batch 1: weight bytes read per second on cuBLAS
#        (engine_8b) and on our dense GEMV (engine_8b_gemv, ARQON_CUDA_DENSE_GEMV=warp_per_row_x4);
#      - transformers' greedy decode speed on the SmolLM2 shape (eager and static cache, batches 1 and 32,
#        prompt 32, 128 new tokens), the peer the goals are set against;
#      - our kernels against their CPU references (the kernels' test binaries, CUDA tests only).
#   2. Serving: `arqon serve --device cuda` driven by the OpenAI SDK (tests/openai_sdk/check.py, on the tiny
#      fixture, also with greedy ids and top-k candidates picked on the GPU, ARQON_CUDA_SAMPLING=device, and
#      next to the same server on the CPU), and by the load generator on the checkpoint.
#   3. The other paths, each next to step 1's: the graphed step at batches 8, 64 and 128; the ordinary eager
#      step (peer_check, engine_smollm2); the graphed step over an f32 cache (engine_smollm2_graph_f32kv) and
#      on our dense GEMV for products of 1-32 rows (engine_smollm2_graph_gemv, peer_check_gemv); one
#      ordinary step captured as it stands (graph_probe); decode attention on our paged kernel without
#      graphs (peer_check_paged, engine_smollm2_paged); the layers in Q4_1 on candle's kernels and on our
#      quant_gemv with graphs (engine_smollm2_q4, engine_smollm2_q4_ours); `arqon bench kernels` (every kernel variant at the
#      checkpoint's shapes: this SKU's kernel plan and report in bench_kernels/, its `sampling` key our GPU
#      picks against the host's); a LoRA adapter on the tiny fixture next to the CPU; load runs with
#      graphs, with sampling on the GPU, and on a cache small enough to preempt.
# Each step has a time limit and the job a deadline (JOB_SECONDS, default 510): a step that would start
# past it is skipped and says so. Every log and JSON goes to a work folder ($WORK); after each step
# $OUT/summary.txt (the steps so far, the goals' table, the logs' key lines) and $OUT/results.tgz (the
# whole work folder) are written again, so a job stopped at the call's limit still brings back all that
# ended (the device tool brings back at most 8 files).
#   bash .device/job.sh                         # on the GPU machine
#   DEVICE=cpu bash .device/job.sh              # a dry run of the plumbing anywhere (no torch: the
#                                               # tiny fixture stands in for the checkpoint)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
OUT=${OUT:-/tmp/arqon-gpu-out}
W=${WORK:-/tmp/arqon-gpu-work}
DEVICE=${DEVICE:-cuda}
JOB_SECONDS=${JOB_SECONDS:-510}
rm -rf "$W" && mkdir -p "$OUT" "$W"
start=$(date +%s)
bin=/tmp/arqon-gpu-bin
mkdir -p "$bin"
summary=()
left() { echo $((JOB_SECONDS - ($(date +%s) - start))); }

# The summary: the steps so far, the goals, and the logs' key lines.
report() {
  echo "## summary ($(($(date +%s) - start)) s)"
  cat "$W/gpu.txt" 2> /dev/null
  printf '%s\n' "${summary[@]}"
  echo "### goals"
  python3 "$here/goals.py" "$W" 2>&1
  local f
  for f in engine_smollm2_graph peer_check_graph engine_8b engine_8b_gemv copy_bandwidth kernels \
    engine_smollm2_graph_more peer_check peer_check_paged peer_check_gemv engine_smollm2 \
    engine_smollm2_graph_f32kv engine_smollm2_graph_gemv graph_probe engine_smollm2_paged engine_smollm2_q4 \
    engine_smollm2_q4_ours loadgen loadgen_graph \
    loadgen_device loadgen_preempt; do
    [ -f "$W/$f.log" ] && { echo "### $f"; grep -E '^\||^batch |test result|TB/s|decode graphs|KV cache|FAILED|panicked|error' "$W/$f.log" | awk '!seen[$0]++' | head -24; }
  done
  for f in peer_smollm2; do [ -f "$W/$f.log" ] && { echo "### $f"; grep -E '^(eager|static)' "$W/$f.log"; }; done
  [ -f "$W/metrics_preempt.txt" ] && { echo "### preemption"; cat "$W/metrics_preempt.txt"; }
  [ -f "$W/metrics_graph.txt" ] && { echo "### serving steps with graphs on"; cat "$W/metrics_graph.txt"; }
  [ -f "$W/bench_kernels/summary.md" ] && { echo "### kernel plan"; grep -E '^(Plan|\|)' "$W/bench_kernels/summary.md"; }
}
# What comes back, written again whole (a new file moved over the old, so a stop mid-write loses nothing).
save() {
  report > "$OUT/summary.txt.new" 2>&1 && mv "$OUT/summary.txt.new" "$OUT/summary.txt"
  tar -C "$W" -czf "$OUT/results.tgz.new" . 2> /dev/null && mv "$OUT/results.tgz.new" "$OUT/results.tgz"
}
note() { summary+=("$1"); echo "== $1"; save; }
# step NAME LIMIT_S CMD...: runs CMD with a time limit if the deadline allows, logging to $W/NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt 20 ]; then note "$name: skipped (job deadline)"; return 1; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local t0; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  note "$name: rc=$rc in $(($(date +%s) - t0)) s"
  return $rc
}

for z in "$here"/bin/*.xz; do xz -dc "$z" > "$bin/$(basename "$z" .xz)"; done
chmod +x "$bin"/*
{ nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || true; } | tee "$W/gpu.txt"
# The CUDA binaries link cuBLAS, cuRAND, NVRTC and cudart dynamically: ldconfig finds them on the GPU
# machine; if not, the ones in Python's nvidia-* packages.
if ldd "$bin/arqon" > "$W/ldd.txt" 2>&1 && grep -q 'not found' "$W/ldd.txt"; then
  libs=$(python3 -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(f) for p in nvidia.__path__ for f in glob.glob(p + "/**/lib*.so*", recursive=True)})))' 2> /dev/null)
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  ldd "$bin/arqon" > "$W/ldd.txt" 2>&1
  note "libraries: some not found by ldconfig; LD_LIBRARY_PATH from Python's nvidia packages; still missing: $(grep -c 'not found' "$W/ldd.txt")"
fi
have_torch=0
python3 -c "import torch, transformers; assert torch.cuda.is_available()" 2> /dev/null && have_torch=1
note "start: device $DEVICE, torch+CUDA $have_torch, deadline ${JOB_SECONDS} s"

ckpt=/tmp/arqon-ckpt-smollm2
ref=/tmp/arqon-ref.json
graphs=(env ARQON_CUDA_ATTENTION=paged ARQON_CUDA_GRAPHS=on)
# A random-weight checkpoint made on the GPU, else (if that failed, not timed
# out: the fallback is slower) by peer_transformers.py --save.
checkpoint() { # checkpoint NAME DIR SHAPE LIMIT_S
  rm -rf "$2"
  step "$1" "$4" python3 "$here/peer_reference.py" checkpoint "$2" --shape "$3"
  local rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    rm -rf "$2" # a part-written checkpoint
  elif [ $rc != 0 ]; then
    rm -rf "$2"
    step "$1_peer" 240 python3 "$here/peer_transformers.py" --shape "$3" --batches 1 --modes eager \
      --runs 0 --new 1 --save "$2"
  fi
  [ -f "$2/config.json" ] && timeout 60 python3 "$here/peer_reference.py" tokenizer "$2" > "$W/tokenizer_$1.log" 2>&1
}

# ---- 1. The goals. --------------------------------------------------------------------------------
if [ $have_torch = 1 ]; then
  checkpoint ckpt_smollm2 "$ckpt" smollm2-135m 90
else
  note "peer: no torch+CUDA here; the tiny fixture stands in for the checkpoint"
  rm -rf "$ckpt" && cp -r "$root/tests/fixtures/tiny-llama" "$ckpt" && rm -f "$ckpt"/tokenizer*.json "$ckpt/chat_template.jinja"
  python3 "$here/peer_reference.py" tokenizer "$ckpt" > "$W/tokenizer.log" 2>&1
  cp "$root/tests/fixtures/tiny-llama/reference.json" "$ref"
fi
if [ -f "$ckpt/config.json" ] && [ "$DEVICE" = cuda ]; then
  # Our fastest path: the paged op's decode steps on fixed buffers, captured per batch bucket and replayed,
  # in bf16 throughout (--kv-cache-dtype auto keeps the model's bf16); the goals' batches first.
  step engine_smollm2_graph 120 "${graphs[@]}" "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
    --prompt-tokens 32 --new-tokens 128 --batches 1,32 --reps 2 --json "$W/engine_smollm2_graph.json"
  # Transformers' logits and greedy tokens for a fixed input, and ours on the same path.
  [ $have_torch = 1 ] && step peer_reference 90 python3 "$here/peer_reference.py" reference "$ckpt" \
    --prompt 32 --new 32 --out "$ref"
  [ -f "$ref" ] && step peer_check_graph 90 "${graphs[@]}" "$bin/peer-check" --model "$ckpt" \
    --reference "$ref" --device "$DEVICE" --json "$W/peer_check_graph.json"
fi

# The copy bandwidth, and the 8B shape at batch 1 (the weights one decode step reads, in weights_8b.json).
if [ $have_torch = 1 ]; then
  step copy_bandwidth 60 python3 - "$W/copy_bandwidth.json" <<'PY'
import json, sys, time, torch
x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
tb_s = 2 * x.numel() / dt / 1e12
print(f"copy bandwidth {tb_s:.2f} TB/s (read + write of 4 GiB)")
json.dump(dict(tb_s=tb_s, counts="bytes read + bytes written", bytes=x.numel(), seconds=dt), open(sys.argv[1], "w"))
PY
fi
if [ $have_torch = 1 ] && [ "$DEVICE" = cuda ] && [ "$(left)" -gt 150 ]; then
  ck8=/tmp/arqon-ckpt-8b
  checkpoint ckpt_8b "$ck8" llama-3.1-8b 150
  if [ -f "$ck8/config.json" ]; then
    cp "$ck8/weights.json" "$W/weights_8b.json" 2> /dev/null
    step engine_8b 120 "$bin/engine-bench" --model "$ck8" --device "$DEVICE" --prompt-tokens 32 --new-tokens 64 \
      --batches 1 --reps 1 --no-prefill --json "$W/engine_8b.json"
    # The same decode with its 1-row products on our dense GEMV (four 16-byte chunks in flight per lane).
    step engine_8b_gemv 100 env ARQON_CUDA_DENSE_GEMV=warp_per_row_x4 "$bin/engine-bench" --model "$ck8" \
      --device "$DEVICE" --prompt-tokens 32 --new-tokens 64 --batches 1 --reps 1 --no-prefill \
      --json "$W/engine_8b_gemv.json"
  fi
  rm -rf "$ck8" # 16 GB of disk back
else
  note "8b: skipped (no torch, not CUDA, or under 150 s left)"
fi

# Transformers' speed on the SmolLM2 shape (the weights do not change its timing: it decodes 128 tokens
# whatever they are). Its static cache compiles the forward on the first call of each batch size.
[ $have_torch = 1 ] && step peer_smollm2 200 python3 "$here/peer_transformers.py" --shape smollm2-135m \
  --batches 1,32 --modes static,eager --runs 1 --out "$W/peer_smollm2.json"

if [ "$DEVICE" = cuda ] && [ -d "$here/kernels" ]; then
  mkdir -p "$W/kernels"
  step kernels 150 env OUT="$W/kernels" bash "$here/kernels/gpu-check.sh" run
fi

# ---- 2. Serving. ----------------------------------------------------------------------------------
pid=""
stop() { [ -n "$pid" ] && { kill "$pid" 2> /dev/null; wait "$pid" 2> /dev/null; }; pid=""; }
serve() { # serve NAME MODEL DEVICE: starts a server, sets $addr and $pid ($SERVE_KV: the cache's size flag)
  if [ "$(left)" -lt 40 ]; then note "serve $1: skipped (job deadline)"; return 1; fi
  # shellcheck disable=SC2086
  "$bin/arqon" serve --model "$2" --device "$3" --served-model-name m --port 0 \
    ${SERVE_KV:---kv-cache-memory-fraction 0.5} > "$W/serve_$1.log" 2>&1 &
  pid=$!
  addr=""
  local t0; t0=$(date +%s)
  while [ $(($(date +%s) - t0)) -lt 120 ] && [ "$(left)" -gt 20 ]; do
    addr=$(grep -o 'listening on http://[0-9.:]*' "$W/serve_$1.log" | head -1 | sed 's/listening on //')
    [ -n "$addr" ] && curl -sf "$addr/ready" > /dev/null 2>&1 && return 0
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.5
  done
  note "serve $1: not ready (serve_$1.log)"
  stop
  return 1
}
sdk_cfg='{"prompt": "The capital of France is", "question": "What is the capital of France?", "max_tokens": 12, "stop": ["."]}'
# The SDK as pack.sh installed it for the GPU machine's Python (SDK_DIR: another, for a dry run).
sdk=${SDK_DIR:-}
if [ -z "$sdk" ] && [ -f "$here/openai-sdk-py.tar.xz" ]; then
  rm -rf /tmp/openai-sdk-py && tar -C /tmp -xJf "$here/openai-sdk-py.tar.xz" && sdk=/tmp/openai-sdk-py
fi
if [ -n "$sdk" ] && PYTHONPATH=$sdk timeout 60 python3 -c "import openai" > "$W/sdk_import.log" 2>&1; then
  # DEVICE:SAMPLING: on CUDA also with greedy ids and top-k candidates picked on the GPU (ARQON_CUDA_SAMPLING=device).
  runs=("$DEVICE:")
  [ "$DEVICE" = cuda ] && runs+=("cuda:device")
  runs+=("cpu:")
  for run in "${runs[@]}"; do
    dev=${run%%:*} sampling=${run#*:}
    name=sdk_$dev${sampling:+_$sampling}
    if ARQON_CUDA_SAMPLING=$sampling serve "$name" "$root/tests/fixtures/tiny-llama" "$dev"; then
      PYTHONPATH=$sdk step "$name" 90 python3 "$root/tests/openai_sdk/check.py" "$addr" m "$sdk_cfg"
      cp "$W/$name.log" "$W/$name.json"
      curl -s "$addr/metrics" > "$W/metrics_$name.txt"
    fi
    stop
    [ "$dev" = cpu ] && break
  done
  python3 - "$W" <<'PY' > "$W/sdk_compare.log" 2>&1 || true
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
  while read -r l; do note "$l"; done < "$W/sdk_compare.log"
else
  note "sdk: skipped (no SDK in .device, or it does not import here: sdk_import.log)"
fi
if [ -f "$ckpt/config.json" ] && serve load "$ckpt" "$DEVICE"; then
  step loadgen 120 "$bin/loadgen" --url "$addr" --model m --concurrency 1,8,32 --requests 32 --max-tokens 64 \
    --json "$W/loadgen.json"
  curl -s "$addr/metrics" > "$W/metrics_load.txt"
fi
stop

# ---- 3. The other paths, each next to step 1's. ----------------------------------------------------
if [ -f "$ckpt/config.json" ]; then
  if [ "$DEVICE" = cuda ]; then
    # The graphed step at the other batch buckets.
    step engine_smollm2_graph_more 120 "${graphs[@]}" "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --new-tokens 128 --batches 8,64,128 --reps 2 --no-prefill \
      --json "$W/engine_smollm2_graph_more.json"
  fi
  # The ordinary (eager) step: logits and tokens, and speed.
  [ -f "$ref" ] && step peer_check 120 "$bin/peer-check" --model "$ckpt" --reference "$ref" \
    --device "$DEVICE" --json "$W/peer_check.json"
  step engine_smollm2 180 "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" --prompt-tokens 32 --new-tokens 128 \
    --batches 1,8,32,64,128 --reps 2 --json "$W/engine_smollm2.json"
  if [ "$DEVICE" = cuda ]; then
    # The graphed step over an f32 cache (f32 activations, bf16 products converted around each).
    step engine_smollm2_graph_f32kv 75 "${graphs[@]}" "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --kv-cache-dtype f32 --prompt-tokens 32 --new-tokens 128 --batches 1,32 --reps 1 \
      --json "$W/engine_smollm2_graph_f32kv.json"
    # The graphed steps with their products of 1-32 rows on our dense GEMV (ARQON_CUDA_DENSE_GEMV), not
    # cuBLAS: its speed next to engine_smollm2_graph's batches 1, 8 and 32, and its logits and tokens.
    gemv=("${graphs[@]}" ARQON_CUDA_DENSE_GEMV=warp_per_row)
    step engine_smollm2_graph_gemv 60 "${gemv[@]}" "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --new-tokens 128 --batches 1,8,32 --reps 2 --json "$W/engine_smollm2_graph_gemv.json"
    [ -f "$ref" ] && step peer_check_gemv 60 "${gemv[@]}" "$bin/peer-check" --model "$ckpt" \
      --reference "$ref" --device "$DEVICE" --json "$W/peer_check_gemv.json"
    # One decode step of the ordinary path captured as it stands and replayed, next to the eager step.
    step graph_probe 45 "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --graph-probe --batches 1,8,32 --reps 20 --json "$W/graph_probe.json"
    # Decode attention on our paged_attention kernel without graphs.
    [ -f "$ref" ] && ARQON_CUDA_ATTENTION=paged step peer_check_paged 120 "$bin/peer-check" \
      --model "$ckpt" --reference "$ref" --device "$DEVICE" --json "$W/peer_check_paged.json"
    ARQON_CUDA_ATTENTION=paged step engine_smollm2_paged 180 "$bin/engine-bench" --model "$ckpt" --device "$DEVICE" \
      --prompt-tokens 32 --new-tokens 128 --batches 1,8,32,64,128 --reps 2 --json "$W/engine_smollm2_paged.json"
    # The layers in Q4_1, as the default model ships: candle's quantized kernels (eager: they cannot be
    # captured), next to our quant_gemv (ARQON_CUDA_QUANTIZED=ours) with its decode steps as graphs.
    q4=(--model "$ckpt" --device "$DEVICE" --quantize q4_1 --prompt-tokens 32 --new-tokens 128 --batches 1,8 --reps 1)
    step engine_smollm2_q4 60 "$bin/engine-bench" "${q4[@]}" --json "$W/engine_smollm2_q4.json"
    step engine_smollm2_q4_ours 60 "${graphs[@]}" ARQON_CUDA_QUANTIZED=ours "$bin/engine-bench" "${q4[@]}" \
      --json "$W/engine_smollm2_q4_ours.json"
  fi
  # This SKU's kernel plan: every variant of every kernel at the checkpoint's shapes.
  step bench_kernels 90 "$bin/arqon" bench kernels --model "$ckpt" --device "$DEVICE" --min-ms 10 \
    --out "$W/bench_kernels"
fi
# LoRA on the device: the tiny fixture's adapter applied per request and merged, next to the CPU.
lora() { # lora NAME DEVICE [--merge]
  step "lora_$1" 60 "$bin/arqon" generate --model "$root/tests/fixtures/tiny-llama" --device "$2" \
    --adapter "$root/tests/fixtures/tiny-lora" --prompt "the quick brown fox" --max-tokens 24 "${@:3}"
}
for mode in apply merge; do
  flag=(); [ $mode = merge ] && flag=(--merge)
  lora "${DEVICE}_$mode" "$DEVICE" "${flag[@]}" || continue
  if [ "$DEVICE" != cpu ] && lora "cpu_$mode" cpu "${flag[@]}"; then
    # The text, less the timing line on stderr (it follows the text on its last line).
    text() { sed 's/arqon: prefill .*$//' "$W/lora_$1.log" 2> /dev/null; }
    a=$(text "${DEVICE}_$mode") b=$(text "cpu_$mode")
    if [ -n "$a" ] && [ "$a" = "$b" ]; then note "lora $mode: same text as the CPU"; else note "lora $mode: differs from the CPU"; fi
  fi
done
if [ -f "$ckpt/config.json" ]; then
  # The same load with decode steps as CUDA graphs on the paged op: the server's steps by path.
  if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 240 ] && ARQON_CUDA_ATTENTION=paged ARQON_CUDA_GRAPHS=on \
    serve load_graph "$ckpt" cuda; then
    step loadgen_graph 120 "$bin/loadgen" --url "$addr" --model m --concurrency 1,8,32 --requests 32 \
      --max-tokens 64 --json "$W/loadgen_graph.json"
    curl -s "$addr/metrics" | grep -E '^arqon_engine_steps_total' > "$W/metrics_graph.txt"
  fi
  stop
  # The same load with greedy ids picked on the GPU (only ids cross to the host, not logits).
  if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 240 ] && ARQON_CUDA_SAMPLING=device serve load_device "$ckpt" cuda; then
    step loadgen_device 120 "$bin/loadgen" --url "$addr" --model m --concurrency 1,8,32 --requests 32 \
      --max-tokens 64 --json "$W/loadgen_device.json"
  fi
  stop
  # Preemption on the device: a 32 MiB cache (45 blocks of this shape) under 32 clients that
  # would hold 192: sequences are preempted and compute their tokens again row by row.
  if [ "$(left)" -gt 200 ] && SERVE_KV="--kv-cache-mb 32" serve preempt "$ckpt" "$DEVICE"; then
    step loadgen_preempt 120 "$bin/loadgen" --url "$addr" --model m --concurrency 32 --requests 64 \
      --max-tokens 64 --json "$W/loadgen_preempt.json"
    curl -s "$addr/metrics" | grep -E '^arqon_(preemptions_total|generation_tokens_total|requests_total)' \
      > "$W/metrics_preempt.txt"
  fi
  stop
fi

note "done"
echo
cat "$OUT/summary.txt"
exit 0
