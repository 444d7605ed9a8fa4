#!/usr/bin/env python3
"""How closely llama.cpp on *this* machine reproduces the shared llama.cpp fixture.

`shared/fixtures/llamacpp_greedy.json` was made by llama-cpp-python 0.3.36 on
some CPU. This runs the same version here on the same file, greedy, and prints,
per fixture prompt, the first step where the two llama.cpp runs pick different
tokens and the largest top-5 logit difference before it: the spread that CPU
SIMD paths alone cause, against which `tests/reference_llamacpp.rs` sets its
tolerances. Writes this machine's top-5 logits as JSON (`--json`).

    $LLAMA_VENV/bin/python bench/llamacpp-self-agreement.py --model PATH [--json out.json]
"""
import argparse
import json
import os
import sys

import llama_cpp as L
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_llamacpp import Engine  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/fixtures/llamacpp_greedy.json")


def last_logits(e, entries):
    b = e.batch
    b.n_tokens = len(entries)
    for i, (t, p) in enumerate(entries):
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, p, 1, 0
        b.logits[i] = i == len(entries) - 1
    if L.llama_decode(e.ctx, b) != 0:
        raise RuntimeError("llama_decode failed")
    ptr = L.llama_get_logits_ith(e.ctx, len(entries) - 1)
    return np.ctypeslib.as_array(ptr, shape=(e.n_vocab,)).copy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--fixture", default=FIXTURE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    fx = json.load(open(a.fixture))
    e = Engine(a.model, a.threads, 1)
    out = {}
    print("| prompt | steps | first parting | fixture margin there | max top-5 diff before |\n|---|---|---|---|---|")
    for f in fx["fixtures"]:
        e.clear()
        ids = f["prompt_ids"]
        row = last_logits(e, [(t, i) for i, t in enumerate(ids)])
        pos, steps = len(ids), []
        for _ in f["top5_logits_per_step"]:
            top = np.argsort(-row)[:5]
            steps.append([[int(i), float(row[i])] for i in top])
            row = last_logits(e, [(int(top[0]), pos)])
            pos += 1
        parted, maxd = None, 0.0
        for s, (mine, theirs) in enumerate(zip(steps, f["top5_logits_per_step"])):
            if mine[0][0] != theirs[0][0]:
                parted = s
                break
            here = dict((i, l) for i, l in mine)
            maxd = max([maxd] + [abs(here[i] - l) for i, l in theirs if i in here])
        margin = "" if parted is None else f"{theirs[0][1] - theirs[1][1]:.4f}"
        print(f"| {f['name']} | {len(steps)} | {'-' if parted is None else parted} | {margin} | {maxd:.4f} |")
        out[f["name"]] = steps
    if a.json:
        json.dump({"engine": "llama.cpp", "version": L.__version__, "top5_logits_per_step": out}, open(a.json, "w"))


if __name__ == "__main__":
    main()
