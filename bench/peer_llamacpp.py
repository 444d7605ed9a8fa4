#!/usr/bin/env python3
"""llama.cpp's side of `engine-bench`: the same measurements on the same GGUF file.

Prefill tokens/s of the 128-token bench prompt, and decode tokens/s of 128 new
tokens at batch 1 and batch 8 (greedy, llama.cpp's own batched decode through
llama-cpp-python's low-level API), median of --reps runs. Prints a table and
writes JSON in engine-bench's schema.

    python bench/peer_llamacpp.py --model PATH --threads 2 --json out.json
"""
import argparse
import ctypes
import json
import statistics
import time

import llama_cpp as L
import numpy as np

PROMPT = (
    "The history of computing is a story of layers. At the bottom are transistors, switching billions of "
    "times per second; above them sit logic gates, arithmetic units and caches; above those, instruction "
    "sets, compilers, operating systems and runtimes; and at the top, the applications that people actually "
    "use. Each layer hides the complexity of the one beneath it, which is why a programmer can write a web "
    "server without knowing how a carry-lookahead adder works. Language models add yet another layer. A "
    "model with a hundred million parameters is, in the end, a long sequence of matrix multiplications, "
    "normalisations and nonlinear"
)


class Engine:
    def __init__(self, path, threads, max_batch):
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx = 4096
        cp.n_batch = 512
        cp.n_ubatch = 512
        cp.n_seq_max = max_batch
        cp.n_threads = threads
        cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(512, 0, max_batch)

    def tokenize(self, text):
        raw = text.encode()
        buf = (L.llama_token * 4096)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, 4096, False, True)
        return list(buf[:n])

    def clear(self):
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, entries):
        """entries: (token, pos, seq, want_logits). Returns argmax per entry wanting logits."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (t, p, s, want) in enumerate(entries):
            b.token[i] = t
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = s
            b.logits[i] = want
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        out = []
        for i, e in enumerate(entries):
            if e[3]:
                ptr = L.llama_get_logits_ith(self.ctx, i)
                out.append(int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))))
        return out


def prefill_rate(e, ids):
    e.clear()
    t = time.perf_counter()
    e.decode([(tok, i, 0, i == len(ids) - 1) for i, tok in enumerate(ids)])
    return len(ids) / (time.perf_counter() - t)


def decode_rate(e, ids, batch, n):
    e.clear()
    entries = []
    for s in range(batch):
        entries += [(tok, i, s, i == len(ids) - 1) for i, tok in enumerate(ids)]
    # Prefill every sequence (not timed), in pieces of at most n_batch tokens.
    last = []
    for k in range(0, len(entries), 512):
        last += e.decode(entries[k:k + 512])
    t = time.perf_counter()
    pos = len(ids)
    for _ in range(n - 1):
        last = e.decode([(last[s], pos, s, True) for s in range(batch)])
        pos += 1
    return batch * (n - 1) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    e = Engine(a.model, a.threads, 8)
    ids = e.tokenize(PROMPT)
    decode_rate(e, ids, 1, 8)  # warm-up
    rows = [{"metric": "prefill", "batch": 1, "tokens": len(ids),
             "tokens_per_s": statistics.median(prefill_rate(e, ids) for _ in range(a.reps))}]
    for batch in (1, 8):
        r = statistics.median(decode_rate(e, ids, batch, a.new_tokens) for _ in range(a.reps))
        rows.append({"metric": "decode", "batch": batch, "tokens": a.new_tokens, "tokens_per_s": r})
    print("| engine | metric | batch | tokens | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| llama.cpp | {r['metric']} | {r['batch']} | {r['tokens']} | {r['tokens_per_s']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"engine": "llama.cpp", "version": L.__version__, "model": a.model, "threads": a.threads,
                       "prompt_tokens": len(ids), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
