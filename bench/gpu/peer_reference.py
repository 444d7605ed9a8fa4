"""Helpers for the GPU job (bench/gpu/job.sh) on a random-weight checkpoint made by
shared/gpu/peer_transformers.py --save (config.json + model.safetensors, no tokenizer).

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
    if a.cmd == "tokenizer":
        write_tokenizer(a.dir)
    else:
        reference(a.dir, a.prompt, a.new, a.out, a.seed, a.dtype)


if __name__ == "__main__":
    main()
