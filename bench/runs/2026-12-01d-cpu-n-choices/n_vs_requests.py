"""The n choices of one request against as many separate requests, on one server.

One request with `n` choices computes its prompt once and forks the others from it;
`n` concurrent requests of one choice each compute the prompt `n` times (what a request
with `n` choices did before the fork). Same prompt, same sampling, same server, alternating
rounds; prints the medians and their ratio.

    python3 n_vs_requests.py ADDR PROMPT_FILE [N] [MAX_TOKENS] [ROUNDS]
"""
import json, statistics, sys, threading, time, urllib.request

addr, prompt_file = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 8
max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 16
rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 5
prompt = open(prompt_file).read()


def post(body):
    req = urllib.request.Request(f"http://{addr}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=600))


def body(choices, seed):
    return {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "n": choices, "temperature": 0.8,
            "seed": seed, "ignore_eos": True}


def one_request():
    t = time.perf_counter()
    b = post(body(n, 1))
    assert len(b["choices"]) == n
    return time.perf_counter() - t, b["usage"]["prompt_tokens"]


def separate():
    t = time.perf_counter()
    out = [None] * n

    def run(i):
        out[i] = post(body(1, 1 + i))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    assert all(o and len(o["choices"]) == 1 for o in out)
    return time.perf_counter() - t


post(body(1, 0))  # warm-up
forked, apart = [], []
for _ in range(rounds):
    dt, prompt_tokens = one_request()
    forked.append(dt)
    apart.append(separate())
f, a = statistics.median(forked), statistics.median(apart)
print(json.dumps({"n": n, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "rounds": rounds,
                  "one_request_n_choices_s": forked, "n_requests_s": apart,
                  "median_one_request_s": round(f, 3), "median_n_requests_s": round(a, 3),
                  "ratio": round(a / f, 2)}, indent=1))
