"""The issue's speed goals from the GPU job's results (bench/gpu/job.sh), as a table and as JSON.

  python3 goals.py WORK_DIR            # prints the table, writes WORK_DIR/goals.json

Reads what the job wrote so far (any file may be missing: that goal is then "not measured"):
  engine_smollm2_graph.json   our decode tokens/s per batch on the SmolLM2-shape checkpoint (bf16)
  peer_smollm2.json           transformers' tokens/s on the same shape (eager, static cache)
  peer_check_graph.json       our logits and greedy tokens against transformers'
  weights_8b.json             the 8B checkpoint's bytes read per decode step (peer_reference.py checkpoint)
  engine_8b.json, engine_8b_gemv.json   our batch-1 decode tokens/s on it (cuBLAS, our dense GEMV)
  copy_bandwidth.json         a device-to-device copy's bytes read + written per second
The goals are read on engine-bench's `generate` rows (every generated token over the whole call,
prefill included), as transformers' figures count; its `decode` rows (decode steps alone) are shown
beside them.
"""
import json, os, sys

GOALS = {1: 1500.0, 32: 20000.0}  # tokens/s on the SmolLM2 shape, bf16, prompt 32, 128 new tokens
BANDWIDTH_SHARE = 0.8  # of the copy bandwidth, as weight bytes read per second on the 8B shape at batch 1


def load(d, name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rates(r, metric):
    """batch -> tokens/s of one metric from an engine-bench JSON."""
    if not r:
        return {}
    return {row["batch"]: row["tokens_per_s"] for row in r.get("rows", []) if row.get("metric") == metric}


def main():
    d = sys.argv[1]
    out, lines = {}, ["| goal | ours | target | peer | reached |", "|---|---|---|---|---|"]
    graph = load(d, "engine_smollm2_graph.json")
    ours, decode = rates(graph, "generate"), rates(graph, "decode")
    peer = (load(d, "peer_smollm2.json") or {}).get("runs", {})
    for b, target in GOALS.items():
        v = ours.get(b)
        p = peer.get(f"static_b{b}", {}).get("tok_s")
        pe = peer.get(f"eager_b{b}", {}).get("tok_s")
        out[f"smollm2_b{b}"] = dict(ours_tok_s=v, ours_decode_tok_s=decode.get(b), target=target,
                                   transformers_static=p, transformers_eager=pe,
                                   reached=None if v is None else v >= target)
        ratio = f"{v / p:.2f}x static" if v and p else "-"
        cell = f"{v:.1f} (decode alone {decode.get(b)})" if v is not None else "not measured"
        lines.append(f"| SmolLM2 b{b} tok/s | {cell} | {target:.0f} | "
                     f"static {p}, eager {pe} ({ratio}) | {out[f'smollm2_b{b}']['reached']} |")
    w, copy = load(d, "weights_8b.json"), load(d, "copy_bandwidth.json")
    bw = copy.get("tb_s") if copy else None
    for name in ("engine_8b", "engine_8b_gemv"):
        v = rates(load(d, f"{name}.json"), "decode").get(1)
        bps = v * w["bytes_read_per_step"] / 1e12 if v and w else None
        share = bps / bw if bps and bw else None
        out[name] = dict(tok_s=v, weight_tb_s=bps, copy_tb_s=bw, share_of_copy=share,
                         reached=None if share is None else share >= BANDWIDTH_SHARE)
        cell = f"{bps:.2f} TB/s ({v:.1f} tok/s)" if bps else "not measured"
        target = f"{BANDWIDTH_SHARE * bw:.2f} TB/s (0.8 x copy {bw:.2f})" if bw else "0.8 x copy (not measured)"
        lines.append(f"| 8B b1 weight bytes/s, {name} | {cell} | {target} | - | {out[name]['reached']} |")
    pc = load(d, "peer_check_graph.json")
    if pc and isinstance(pc.get("max_rel_err"), (int, float)):
        out["peer_check_graph"] = {k: pc.get(k) for k in ("max_rel_err", "argmax_equal", "positions",
                                                           "greedy_agree", "greedy_total")}
        lines.append(f"| logits vs transformers (graphed bf16 step) | max rel err {pc.get('max_rel_err'):.3e}, "
                     f"argmax {pc.get('argmax_equal')}/{pc.get('positions')}, greedy "
                     f"{pc.get('greedy_agree')}/{pc.get('greedy_total')} | greedy 32/32 | - | "
                     f"{pc.get('greedy_agree') == pc.get('greedy_total')} |")
    with open(os.path.join(d, "goals.json"), "w") as f:
        json.dump(out, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
