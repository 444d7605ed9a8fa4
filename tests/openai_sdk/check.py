"""Drives `arqon serve` with the official OpenAI Python SDK.

Usage: python3 check.py BASE_URL MODEL CONFIG_JSON
CONFIG_JSON: {"prompt": str, "question": str, "max_tokens": int, "stop": [str]}

Prints one JSON object with what the SDK saw; tests/server_openai.rs asserts on it.
"""
import json
import sys

import openai
from openai import OpenAI

base, model, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = OpenAI(base_url=base + "/v1", api_key="sk-unused", max_retries=0, timeout=300)
prompt, n_tok = cfg["prompt"], cfg["max_tokens"]
messages = [{"role": "user", "content": cfg["question"]}]
out = {}


def usage(u):
    return None if u is None else {k: getattr(u, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


r = client.completions.create(model=model, prompt=prompt, max_tokens=n_tok, temperature=0)
out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason, "usage": usage(r.usage)}

text, finish, u = "", None, None
for ch in client.completions.create(
    model=model, prompt=prompt, max_tokens=n_tok, temperature=0, stream=True, stream_options={"include_usage": True}
):
    for c in ch.choices:
        text += c.text
        finish = c.finish_reason or finish
    u = usage(ch.usage) or u
out["completion_stream"] = {"text": text, "finish_reason": finish, "usage": u}

r = client.chat.completions.create(model=model, messages=messages, max_tokens=n_tok, temperature=0, user="test")
out["chat"] = {
    "text": r.choices[0].message.content,
    "role": r.choices[0].message.role,
    "finish_reason": r.choices[0].finish_reason,
    "usage": usage(r.usage),
}

text, finish, u = "", None, None
for ch in client.chat.completions.create(
    model=model, messages=messages, max_completion_tokens=n_tok, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    for c in ch.choices:
        text += c.delta.content or ""
        finish = c.finish_reason or finish
    u = usage(ch.usage) or u
out["chat_stream"] = {"text": text, "finish_reason": finish, "usage": u}

r = client.chat.completions.create(model=model, messages=messages, max_tokens=n_tok, temperature=0, n=2)
out["chat_n2"] = {"texts": [c.message.content for c in r.choices], "usage": usage(r.usage)}

r = client.completions.create(model=model, prompt=prompt, max_tokens=n_tok, temperature=0, stop=cfg["stop"])
out["completion_stop"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}

r = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
)
out["chat_logprobs"] = {
    "text": r.choices[0].message.content,
    "content": [
        {"token": t.token, "logprob": t.logprob, "top": [x.token for x in t.top_logprobs]}
        for t in r.choices[0].logprobs.content
    ],
}

r = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
lp = r.choices[0].logprobs
out["completion_logprobs"] = {
    "text": r.choices[0].text,
    "tokens": lp.tokens,
    "token_logprobs": lp.token_logprobs,
    "top_logprobs": lp.top_logprobs,
}

r = client.completions.create(
    model=model, prompt=prompt, max_tokens=8, temperature=0.8, top_p=0.9, seed=7,
    presence_penalty=0.5, frequency_penalty=0.5,
)
r2 = client.completions.create(
    model=model, prompt=prompt, max_tokens=8, temperature=0.8, top_p=0.9, seed=7,
    presence_penalty=0.5, frequency_penalty=0.5,
)
out["seeded_same"] = r.choices[0].text == r2.choices[0].text

# vLLM's top_k: the server draws from the row's best candidates (picked where the logits are),
# or, when logprobs are asked, from the whole row; one seed, one text either way.
top_k = dict(model=model, prompt=prompt, max_tokens=16, temperature=1.1, top_p=0.95, seed=5,
             extra_body={"top_k": 40, "ignore_eos": True})
a = client.completions.create(**top_k)
b = client.completions.create(logprobs=1, **top_k)
out["top_k_text"] = a.choices[0].text
out["top_k_candidates_same_as_row"] = a.choices[0].text == b.choices[0].text

# A temperature alone: the server draws from the row's chunk sums and one chunk, or, with
# logprobs, from the whole row (on a GPU the sums are the device's: equal but for roundings).
temp = dict(model=model, prompt=prompt, max_tokens=16, temperature=0.9, seed=6, extra_body={"ignore_eos": True})
a = client.completions.create(**temp)
b = client.completions.create(logprobs=1, **temp)
out["temperature_chunk_same_as_row"] = a.choices[0].text == b.choices[0].text

# top_p alone: from the row's weights and 128 best candidates when its nucleus lies among them.
nucleus = dict(model=model, prompt=prompt, max_tokens=16, temperature=0.3, top_p=0.8, seed=8,
               extra_body={"ignore_eos": True})
a = client.completions.create(**nucleus)
b = client.completions.create(logprobs=1, **nucleus)
out["top_p_nucleus_same_as_row"] = a.choices[0].text == b.choices[0].text

out["models"] = [m.id for m in client.models.list()]

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    out["not_found"] = None
except openai.NotFoundError as e:
    out["not_found"] = {"status": e.status_code, "code": e.code}

try:
    client.completions.create(model=model, prompt=prompt, max_tokens=1_000_000)
    out["too_long"] = None
except openai.BadRequestError as e:
    out["too_long"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
