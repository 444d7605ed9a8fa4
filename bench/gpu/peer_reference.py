"""Helpers for the GPU job (bench/gpu/job.sh) on a random-weight checkpoint made by
shared/gpu/peer_transformers.py --save (config.json + model.safetensors, no tokenizer).

  python3 peer_reference.py checkpoint DIR --shape smollm2-135m
      writes a random-weight checkpoint of that shape (peer_transformers.py's configurations), made on
      the GPU in bf16 (seconds, where peer_transformers.py --save builds it in f32 on the CPU first:
      minutes for the 8B shape), and DIR/weights.json: its bytes, and the bytes one decode step reads
      (every matrix, not the embedding table unless the LM head shares it: a step gathers its rows).
  python3 peer_reference.py tokenizer DIR
      writes DIR/tokenizer.json: a word-level vocabulary "<unk>", "<s>", "</s>", "t3", ... of the
      checkpoint's vocab_size, so our loader (which wants a tokenizer) can load it; prompts are token ids.
  python3 peer_reference.py reference DIR --prompt 32 --new 32 --out ref.json
      transformers' logits at every position of a seeded random prompt, its greedy continuation and
      the top-1 minus top-2 margin at each greedy step, in the format bench's `peer-check` reads
      (the same as tests/fixtures/*/reference.json).
"""
import argparse, json, os


def write_tokenizer(d):
    with open(os.path.join(d, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for i, t in enumerate(specials)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    print(f"{d}/tokenizer.json: word-level, {vocab_size} tokens")


def checkpoint(d, shape, seed, dtype):
    import sys
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peer_transformers import config

    torch.manual_seed(seed)
    cfg = config(shape)
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(d, safe_serialization=True)
    # Each tensor once: a tied LM head is the embedding's tensor under a second name in the state dict.
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    e = model.get_input_embeddings().weight
    embed = e.numel() * e.element_size()
    per_step = total - (0 if cfg.tie_word_embeddings else embed)
    w = dict(shape=shape, dtype=dtype, bytes=total, embedding_bytes=embed, tied=cfg.tie_word_embeddings,
             bytes_read_per_step=per_step)
    with open(os.path.join(d, "weights.json"), "w") as f:
        json.dump(w, f)
    print(f"{d}: {shape} {dtype}, {total / 1e9:.3f} GB, {per_step / 1e9:.3f} GB read per decode step")


def reference(d, prompt, new, out, seed, dtype):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).to("cuda").eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=g).to("cuda")
    with torch.inference_mode():
        logits = model(ids).logits[0].float()
        gen = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2,
                             attention_mask=torch.ones_like(ids), output_scores=True, return_dict_in_generate=True)
    margins = []
    for s in gen.scores:
        top = torch.topk(s[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    r = dict(input_ids=ids[0].tolist(), logits=logits.cpu().tolist(), greedy_ids=gen.sequences[0, prompt:].tolist(),
             margins=margins, dtype=dtype, torch=torch.__version__)
    with open(out, "w") as f:
        json.dump(r, f)
    print(f"{out}: {prompt} positions, {new} greedy tokens, smallest margin {min(margins):.4f}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint")
    c.add_argument("dir")
    c.add_argument("--shape", default="smollm2-135m")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default="bfloat16")
    t = sub.add_parser("tokenizer")
    t.add_argument("dir")
    r = sub.add_parser("reference")
    r.add_argument("dir")
    r.add_argument("--prompt", type=int, default=32)
    r.add_argument("--new", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--out", required=True)
    a = p.parse_args()
    if a.cmd == "checkpoint":
        checkpoint(a.dir, a.shape, a.seed, a.dtype)
    elif a.cmd == "tokenizer":
        write_tokenizer(a.dir)
    else:
        reference(a.dir, a.prompt, a.new, a.out, a.seed, a.dtype)


if __name__ == "__main__":
    main()
