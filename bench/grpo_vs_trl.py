"""thinkforge GRPO vs TRL's GRPOTrainer: seconds per optimizer step, and loss equivalence on one batch.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/grpo_vs_trl.py [--rounds 2] [--steps 5]

Same random-init Qwen2 (hidden 256, 4 layers, 4 heads, intermediate 1024, character vocab, ~4.2M
parameters, fp32), same task (3×2-digit multiplication prompts), same accuracy reward, P=8 prompts ×
G=8 generations × up to 64 new tokens, temperature 1, loss "dapo" (TRL's default), β=0 and β=0.04.
TRL: bf16 and gradient checkpointing off (its CPU defaults turn them on). thinkforge: dynamic
sampling off, so both sides do the same work (a random model scores 0 everywhere; TRL still runs the
forward and backward on zero advantages). The two sides alternate; a round's first step is warm-up.

Loss equivalence: on one identical batch (same completions, same old/ref logprobs, same advantages),
each variant's loss from ``thinkforge.train.losses`` equals TRL's ``_compute_loss`` within 1e-5, with
β = 0.04, with the plain k3 KL (DeepSeekMath) and with the importance-weighted one (DeepSeek-V3.2; TRL
1.16's default ``use_bias_correction_kl``, thinkforge's ``kl_bias_correction``, used by the timed β = 0.04
runs of both sides). ``--equivalence-only`` stops after this check.
Ends with: RESULT grpo_vs_trl thinkforge_s=… trl_s=… ratio=… thinkforge_s_kl=… trl_s_kl=… ratio_kl=… max_loss_diff=…
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scratch import scratch  # noqa: E402  (bench/scratch.py: removed when the run exits)
from sft import build  # noqa: E402  (the same 4.2M Qwen2 as bench/sft.py)

from thinkforge import format as fmt  # noqa: E402
from thinkforge.models import char_tokenizer, save_model  # noqa: E402
from thinkforge.tasks import get_task  # noqa: E402
from thinkforge.verify import extract_answer  # noqa: E402

P, G, NEW = 8, 8, 64
TASK = get_task("mul")


def accuracy(completions, answer, **_):
    """TRL-style reward function: the task's score of the extracted answer."""
    from thinkforge.tasks import Problem

    return [TASK.score(Problem("", "", a), extract_answer(c)) for c, a in zip(completions, answer)]


def trl_trainer(tok, model_path: str, beta: float, steps: int, timer=None):
    """TRL's trainer on the saved start model (a path: with beta > 0 TRL rebuilds the reference from it)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    problems = TASK.problems(P * steps, seed=3)
    ds = Dataset.from_list([{"prompt": fmt.render_prompt(p.question), "answer": p.answer} for p in problems])
    args = GRPOConfig(output_dir=scratch(), per_device_train_batch_size=P * G, num_generations=G,
                      max_completion_length=NEW, beta=beta, bf16=False, fp16=False, gradient_checkpointing=False,
                      use_cpu=True, learning_rate=1e-5, max_steps=steps, report_to=[], logging_steps=10**6,
                      save_strategy="no", temperature=1.0, loss_type="dapo", disable_tqdm=True, seed=0,
                      dataloader_num_workers=0)
    return GRPOTrainer(model=model_path, reward_funcs=accuracy, args=args, train_dataset=ds, processing_class=tok,
                       callbacks=[timer] if timer else [])


def run_trl(tok, start: str, beta: float, steps: int) -> list[float]:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        times: list = []

        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    timer.times = []
    trl_trainer(tok, start, beta, steps, timer).train()
    return timer.times[1:]


def run_thinkforge(tok, start: str, beta: float, steps: int) -> list[float]:
    from thinkforge.train.grpo import GRPOConfig, train_grpo

    out = Path(scratch()) / "run"
    train_grpo(GRPOConfig(model=start, task="mul", out=str(out), steps=steps, prompts_per_step=P, group_size=G,
                          max_new_tokens=NEW, beta=beta, kl_bias_correction=True, loss="dapo", dynamic_sampling=False, lr=1e-5,
                          save_every=10**6, train_problems=P * steps, seed=3, warmup=0))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows[1:]]


def loss_equivalence(tok, start: str) -> float:
    """Max |ours - TRL| over the five variants (β = 0.04), with and without the KL bias correction, on one
    identical batch."""
    from thinkforge.generation import Engine, SamplingParams
    from thinkforge.models import token_logprobs
    from thinkforge.train.losses import LOSSES, k3_kl

    trainer = trl_trainer(tok, start, beta=0.04, steps=1)
    model = trainer.model.eval()  # TRL's eval mode: no gradient-accumulation normaliser
    torch.manual_seed(0)
    questions = [p.question for p in TASK.problems(40) if len(p.question) == 6][:P]  # equal-length prompts
    comps = Engine(model, tok).generate([fmt.render_prompt(q) for q in questions],
                                        SamplingParams(n=G, temperature=1.0, max_new_tokens=24, seed=0))
    plen, clen = len(comps[0].prompt_ids), max(len(c.ids) for c in comps)
    prompt_ids = torch.tensor([c.prompt_ids for c in comps])
    completion = torch.full((len(comps), clen), tok.pad_token_id)
    cmask = torch.zeros((len(comps), clen))
    for i, c in enumerate(comps):
        completion[i, : len(c.ids)] = torch.tensor(c.ids)
        cmask[i, : len(c.ids)] = 1
    with torch.no_grad():
        logp_all, _ = token_logprobs(model, torch.cat([prompt_ids, completion], 1), 1.0)
    logp = logp_all[:, plen - 1 :]  # (N, C): the completion tokens' logprobs
    old = logp + 0.3 * torch.randn_like(logp)  # off-policy enough that clipping happens
    ref = logp + 0.2 * torch.randn_like(logp)
    adv = torch.randn(len(comps))
    worst = 0.0
    for name, correction in [(n, c) for c in (False, True) for n in LOSSES]:
        trainer.args.use_bias_correction_kl = correction
        trainer.loss_type = "grpo" if name == "gspo" else name
        trainer.importance_sampling_level = "sequence" if name == "gspo" else "token"
        eps_low, eps_high = LOSSES[name].bounds()
        trainer.epsilon_low, trainer.epsilon_high = eps_low, eps_high
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion,
                  "completion_mask": cmask.long(), "advantages": adv, "old_per_token_logps": old,
                  "ref_per_token_logps": ref, "num_items_in_batch": cmask.sum()}
        with torch.no_grad():
            theirs = float(trainer._compute_loss(model, inputs))
            v = LOSSES[name]
            ours = v.loss(logp, old, adv, cmask, max_len=NEW)
            ratio = v.ratio(logp, old, cmask) if correction else None
            ours = float(ours + 0.04 * v.reduce(k3_kl(logp, ref, ratio), cmask, NEW))
        print(f"  loss {name:<8} {'corrected KL' if correction else 'plain KL    '} thinkforge {ours:+.7f}  TRL {theirs:+.7f}  |diff| {abs(ours - theirs):.1e}")
        worst = max(worst, abs(ours - theirs))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--equivalence-only", action="store_true", help="only the loss check against TRL")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    tok = char_tokenizer()
    start = str(save_model(build(tok), tok, Path(scratch()) / "start"))
    print("loss equivalence on one batch (beta 0.04):")
    worst = loss_equivalence(tok, start)
    assert worst < 1e-5, f"losses differ from TRL's by {worst}"
    if args.equivalence_only:
        print(f"RESULT grpo_vs_trl max_loss_diff={worst:.1e}")
        return
    result = {}
    for beta in (0.0, 0.04):
        times = {"thinkforge": [], "trl": []}
        for r in range(args.rounds):
            sides = [("thinkforge", lambda: run_thinkforge(tok, start, beta, args.steps)),
                     ("trl", lambda: run_trl(tok, start, beta, args.steps))]
            for name, fn in sides if r % 2 == 0 else sides[::-1]:
                times[name] += fn()
        tf, trl = statistics.median(times["thinkforge"]), statistics.median(times["trl"])
        result[beta] = (tf, trl)
        print(f"beta {beta}: thinkforge {tf:.2f} s/step, TRL {trl:.2f} s/step, ratio {trl / tf:.2f} "
              f"({len(times['thinkforge'])} and {len(times['trl'])} timed steps)")
    (tf0, trl0), (tf1, trl1) = result[0.0], result[0.04]
    print(f"RESULT grpo_vs_trl thinkforge_s={tf0:.2f} trl_s={trl0:.2f} ratio={trl0 / tf0:.2f} "
          f"thinkforge_s_kl={tf1:.2f} trl_s_kl={trl1:.2f} ratio_kl={trl1 / tf1:.2f} max_loss_diff={worst:.1e}")


if __name__ == "__main__":
    main()
