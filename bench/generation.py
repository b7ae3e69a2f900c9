"""thinkforge's generation engine vs HF ``model.generate``, same model, same work, one run.

    .venv/bin/python bench/generation.py [--rounds 5] [--batch 64] [--new 64] [--arch qwen2]

Model: random-init Qwen2 (hidden 256, 4 layers, 4 heads, intermediate 1024, vocab ~100 characters):
~4.3M parameters. Batch 64, 16-token prompts, 64 new tokens, sampling at temperature 1, EOS ignored so
both sides generate exactly batch × new tokens. The two sides alternate, round by round, so a
neighbour's load hits both alike; medians are reported. Correctness checks run first: greedy outputs
identical, and the engine's logprobs equal a full forward pass within 1e-4.
Ends with: RESULT generation thinkforge_tok_s=… hf_tok_s=… ratio=…
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import char_tokenizer


def build(arch: str, tok):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    Config, Model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    cfg = Config(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=512,
                 tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return Model(cfg).eval()


def check(model, tok, engine) -> None:
    prompts = [tok.decode(torch.randint(8, len(tok), (n,)).tolist()) for n in (16, 11, 16, 5)]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ids = torch.tensor([o.prompt_ids])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert ref.tolist() == o.ids, "greedy outputs differ from HF generate"
    err = logprob_error(model, engine, prompts[0], SamplingParams(temperature=1.0, max_new_tokens=32, ignore_eos=True))
    print(f"checks: greedy identical to HF generate on 4 prompts; max logprob error {err:.1e}")


def logprob_error(model, engine, prompt, params) -> float:
    """Max |engine logprob - full-forward logprob| over one sampled completion; asserts it is below 1e-4."""
    o = engine.generate([prompt], params)[0]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([o.prompt_ids + o.ids])).logits[0, :-1].float(), -1)
    ref_lp = lp[len(o.prompt_ids) - 1 :].gather(-1, torch.tensor(o.ids)[:, None])[:, 0]
    err = float((ref_lp - torch.tensor(o.logprobs)).abs().max())
    assert err < 1e-4, f"logprobs differ from a full forward by {err}"
    return err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = char_tokenizer()
    model = build(args.arch, tok)
    n_params = sum(p.numel() for p in model.parameters())
    engine = Engine(model, tok)
    check(model, tok, engine)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, len(tok), (args.batch, args.prompt_len), generator=g)
    prompts = ids.tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new, ignore_eos=True, seed=0)
    work = args.batch * args.new

    def run_tf():
        outs = engine.generate(prompts, params)
        assert sum(len(o.ids) for o in outs) == work

    def run_hf():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 pad_token_id=tok.pad_token_id)
        assert out.shape[1] - ids.shape[1] == args.new

    run_tf(), run_hf()  # warm-up
    times = {"thinkforge": [], "hf": []}
    for r in range(args.rounds):
        for name, fn in ([("thinkforge", run_tf), ("hf", run_hf)] if r % 2 == 0 else [("hf", run_hf), ("thinkforge", run_tf)]):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tf_s, hf_s = statistics.median(times["thinkforge"]), statistics.median(times["hf"])
    print(f"model {args.arch}, {n_params / 1e6:.2f}M parameters; batch {args.batch} x {args.new} new tokens; "
          f"{args.threads} threads; {args.rounds} alternating rounds (medians)")
    print(f"thinkforge engine: {tf_s * 1000:7.1f} ms  {work / tf_s:8.0f} tok/s  ({tf_s / args.new * 1000:.1f} ms/step)")
    print(f"HF generate:       {hf_s * 1000:7.1f} ms  {work / hf_s:8.0f} tok/s  ({hf_s / args.new * 1000:.1f} ms/step)")
    print(f"RESULT generation thinkforge_tok_s={work / tf_s:.0f} hf_tok_s={work / hf_s:.0f} ratio={hf_s / tf_s:.2f}")


if __name__ == "__main__":
    main()
