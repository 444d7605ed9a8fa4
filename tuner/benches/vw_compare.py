#!/usr/bin/env python3
"""Scores Vowpal Wabbit's contextual bandit on the same logged simulator data
as the tuner's policies.

The trace (from `tuner-sim --export-log`) holds every arm's noisy outcome in
every round, so VW is run online and interactively: each round it predicts a
distribution over the 8 arms, we sample one, reveal only that arm's
penalised reward (as a cost) and learn. Regret uses the trace's expected
values, exactly as `BanditTrace::score` does in Rust.

    python3 -m venv /tmp/vwenv && /tmp/vwenv/bin/pip install vowpalwabbit
    cargo run --release -p arqon-bench --bin tuner-sim -- --seed 7 \
        --export-log /tmp/loadshift.jsonl --json /tmp/tuner-sim.json
    /tmp/vwenv/bin/python tuner/benches/vw_compare.py /tmp/loadshift.jsonl /tmp/tuner-sim.json
"""
import json
import random
import sys

import vowpalwabbit


def examples(r, n_arms, chosen=None, cost=None, prob=None):
    f = r["features"]
    shared = (
        f"shared |s load:{f[1]:.6f} load2:{f[2]:.6f} batch:{f[3]:.6f} "
        f"prompt:{f[4]:.6f} device:{f[5]:.6f} bucket{r['bucket']}"
    )
    lines = [shared]
    for a in range(n_arms):
        label = f"0:{cost:.6f}:{prob:.6f} " if a == chosen else ""
        lines.append(f"{label}|a arm{a}")
    return lines


def run(trace, args, seed):
    vw = vowpalwabbit.Workspace(args + f" --cb_min_cost 0 --cb_max_cost 2 --quiet --random_seed {seed}")
    rng = random.Random(seed)
    n_arms = len(trace[0]["arms"])
    regret, violations, choices = 0.0, 0, []
    for r in trace:
        pmf = vw.predict(examples(r, n_arms))
        a = rng.choices(range(n_arms), weights=pmf)[0]
        arm = r["arms"][a]
        regret += r["oracle"] - arm["expected"]
        violations += 0 if arm["feasible"] else 1
        choices.append(a)
        # Costs in [0, 2]: 1 - reward, penalty included (declared to VW below).
        vw.learn(examples(r, n_arms, a, 1.0 - arm["penalised"], max(pmf[a], 1e-6)))
    vw.finish()
    return regret, violations, choices


def adapt_time(trace, choices, start, span=20, frac=0.8):
    for t in range(start, len(choices) - span):
        hits = sum(1 for i in range(t, t + span) if choices[i] == trace[i]["best"])
        if hits >= frac * span:
            return t - start
    return None


def main():
    trace = [json.loads(l) for l in open(sys.argv[1])]
    ours = {}
    if len(sys.argv) > 2:
        out = json.load(open(sys.argv[2]))
        for p in out["bandits"][0]["policies"]:
            ours[p["name"]] = p
    configs = [
        ("vw cb_explore_adf epsilon 0.05", "--cb_explore_adf -q sa --epsilon 0.05"),
        ("vw cb_explore_adf squarecb", "--cb_explore_adf -q sa --squarecb"),
    ]
    print(f"trace: {len(trace)} rounds, {len(trace[0]['arms'])} arms, vowpalwabbit {vowpalwabbit.__version__}")
    print(f"{'policy':<44} {'regret':>9} {'violations':>11} {'time-to-adapt':>14}")
    for name, p in ours.items():
        t = p["time_to_adapt"]
        print(f"{name:<44} {p['regret']:>9.1f} {p['violations']:>11} {str(t):>14}")
    results = {}
    for name, args in configs:
        regs = []
        for seed in (1, 2, 3):
            reg, viol, ch = run(trace, args, seed)
            regs.append(reg)
            t = adapt_time(trace, ch, len(trace) // 2)
            print(f"{name + f' (seed {seed})':<44} {reg:>9.1f} {viol:>11} {str(t):>14}")
        results[name] = sum(regs) / len(regs)
    print(json.dumps({"vw_mean_regret": results}))
    # (--regcb was tried too and did far worse untuned, ~615; left out.)


if __name__ == "__main__":
    main()
