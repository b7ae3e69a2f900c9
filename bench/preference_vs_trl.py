"""thinkforge's Bradley-Terry reward model and DPO vs TRL's RewardTrainer and DPOTrainer: loss on one
identical batch, and seconds per optimizer step.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/preference_vs_trl.py [--rounds 3] [--steps 8]

Same random-init Qwen2 as bench/sft.py (hidden 256, 4 layers, ~4.2M parameters, character vocab, fp32),
same pairs (3x2-digit products: the gold trace as ``chosen``, the trace with a wrong answer as
``rejected``), 16 pairs per step, lr 1e-5, constant schedule. TRL: bf16 and gradient checkpointing off.

Reward model: TRL's ``AutoModelForSequenceClassification`` reads the logit at the last non-pad token
(the EOS it appends); thinkforge's token-classification head reads the logit at the end-of-turn token it
appends (``scorers.preference_ids``). The bench copies thinkforge's initial head into TRL's model, so the
two compute the same function. DPO: sigmoid loss, β = 0.1; both sides precompute the reference's
log-probabilities. The losses of one identical batch must agree within 1e-5.
The two sides alternate, each ``--rounds`` times ``--steps`` steps; a run's first step is warm-up.
Ends with: RESULT preference_vs_trl max_loss_diff=… rm_s=… trl_rm_s=… rm_ratio=… dpo_s=… trl_dpo_s=… dpo_ratio=…
(ratio = TRL seconds / thinkforge seconds).
"""
from __future__ import annotations

import argparse
import json
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
from thinkforge.tasks.files import write_jsonl  # noqa: E402

BATCH, LR = 16, 1e-5


def pairs(n: int) -> list[dict]:
    out = []
    for p in get_task("mul").problems(n, seed=5):
        trace = "\n".join(p.steps)
        out.append({"prompt": fmt.render_prompt(p.question), "chosen": fmt.render_completion(p.answer, trace),
                     "rejected": fmt.render_completion(str(int(p.answer) + 1), trace)})
    return out


class Timer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer.t = time.perf_counter()

            def on_step_end(self, *a, **k):
                timer.times.append(time.perf_counter() - timer.t)

        self.times, self.callback = [], CB()


def trl_args(cls, steps: int, **kw):
    return cls(output_dir=scratch(), per_device_train_batch_size=BATCH, learning_rate=LR, max_steps=steps,
               lr_scheduler_type="constant", warmup_steps=0, bf16=False, fp16=False, gradient_checkpointing=False,
               use_cpu=True, report_to=[], logging_steps=10**6, save_strategy="no", disable_tqdm=True, seed=0,
               dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0, **kw)


def trl_reward_trainer(tok, ours_path: str, rows: list[dict], steps: int, timer=None):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(ours_path, num_labels=1)  # our head's weights
    model.config.pad_token_id = tok.pad_token_id
    return RewardTrainer(model=model, args=trl_args(RewardConfig, steps, max_length=None), processing_class=tok,
                         train_dataset=Dataset.from_list(rows), callbacks=[timer.callback] if timer else [])


def trl_dpo_trainer(tok, start: str, rows: list[dict], steps: int, timer=None, precompute: bool = True):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = trl_args(DPOConfig, steps, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                    max_length=None)
    return DPOTrainer(model=start, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows),
                      callbacks=[timer.callback] if timer else [])


def rm_start(start: str) -> str:
    """thinkforge's reward-model start (the policy under a fresh seeded head), saved so TRL loads the same."""
    from thinkforge.train.reward_model import _backbone

    torch.manual_seed(0)
    model, tok = _backbone(start, "cpu", dropout=0.0)
    out = Path(scratch()) / "rm-start"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def loss_equivalence(tok, start: str, rm_path: str, rows: list[dict]) -> float:
    from transformers import AutoModelForTokenClassification

    from thinkforge.models import load_model
    from thinkforge.preferences import Ranking
    from thinkforge.train import dpo, preference_rm

    batch = rows[:BATCH]
    # reward model: our loss_fn (sum over rankings) / count vs TRL's compute_loss (mean over pairs)
    ours_rm = AutoModelForTokenClassification.from_pretrained(rm_path).eval()
    enc = [preference_rm.encode_ranking(tok, Ranking(r["prompt"], [r["chosen"], r["rejected"]], [0, 1])) for r in batch]
    with torch.no_grad():
        ours = float(preference_rm.make_loss_fn(0.0, tok.pad_token_id, "cpu")(ours_rm, {"rankings": enc})[0]) / len(batch)
        trainer = trl_reward_trainer(tok, rm_path, batch, 1)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.eval()
        theirs = float(trainer.compute_loss(trainer.model, inputs))
    print(f"  reward model loss: thinkforge {ours:.7f}  TRL {theirs:.7f}")
    worst = abs(ours - theirs)
    # DPO: the same pairs; reference = start; the policy = start moved by seeded noise (so the loss is not log 2)
    model, _ = load_model(start, device="cpu")
    path = Path(scratch()) / "prefs.jsonl"
    write_jsonl(batch, path)
    cfg = dpo.DPOConfig(model=start, data=str(path), beta=0.1, eval_problems=0)
    encoded = dpo.encode_pairs(dpo.read_preferences(path), tok, 512)
    dpo.add_reference(encoded, model, tok.pad_token_id, "cpu", mean=False)
    trainer = trl_dpo_trainer(tok, start, batch, 1, precompute=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        trainer.model.load_state_dict(model.state_dict())
        ours = float(dpo.make_loss_fn(cfg, tok.pad_token_id, "cpu")(model.eval(), {"pairs": encoded})[0]) / len(encoded)
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.eval()
        theirs = float(trainer.compute_loss(trainer.model, inputs))
    print(f"  DPO loss:          thinkforge {ours:.7f}  TRL {theirs:.7f}")
    return max(worst, abs(ours - theirs))


def run_ours_rm(start: str, data: str, steps: int) -> list[float]:
    from thinkforge.train.reward_model import RMConfig, train_reward_model

    out = Path(scratch()) / "rm"
    train_reward_model(RMConfig(kind="preference", data=data, policy=start, out=str(out), steps=steps, batch_size=BATCH,
                                lr=LR, warmup=0, min_lr_ratio=1.0, weight_decay=0.0, save_every=10**6, eval_share=0.0))
    return [json.loads(x)["step_time"] for x in (out / "metrics.jsonl").read_text().splitlines()][1:]


def run_ours_dpo(start: str, data: str, steps: int) -> list[float]:
    from thinkforge.train.dpo import DPOConfig, train_dpo

    out = Path(scratch()) / "dpo"
    train_dpo(DPOConfig(model=start, data=data, out=str(out), steps=steps, batch_size=BATCH, lr=LR, warmup=0,
                        beta=0.1, save_every=10**6, eval_problems=0, max_len=512))
    return [json.loads(x)["step_time"] for x in (out / "metrics.jsonl").read_text().splitlines()][1:]


def run_trl(make, steps: int) -> list[float]:
    timer = Timer()
    make(timer).train()
    return timer.times[1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tok = char_tokenizer()
    start = str(save_model(build(tok), tok, Path(scratch()) / "start"))
    rm_path = rm_start(start)
    rows = pairs(BATCH * (args.steps + 1))
    data = Path(scratch()) / "prefs.jsonl"
    write_jsonl(rows, data)
    print("loss on one identical batch:")
    worst = loss_equivalence(tok, start, rm_path, rows)
    assert worst < 1e-5, f"losses differ from TRL's by {worst}"
    times = {k: [] for k in ("rm", "trl_rm", "dpo", "trl_dpo")}
    for r in range(args.rounds):
        sides = [("rm", lambda: run_ours_rm(start, str(data), args.steps)),
                 ("trl_rm", lambda: run_trl(lambda t: trl_reward_trainer(tok, rm_path, rows, args.steps, t), args.steps)),
                 ("dpo", lambda: run_ours_dpo(start, str(data), args.steps)),
                 ("trl_dpo", lambda: run_trl(lambda t: trl_dpo_trainer(tok, start, rows, args.steps, t), args.steps))]
        for name, fn in (sides if r % 2 == 0 else sides[1::-1] + sides[:1:-1]):
            times[name] += fn()
            print(f"round {r} {name:<8} median {statistics.median(times[name]):.3f} s/step", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"RESULT preference_vs_trl max_loss_diff={worst:.2e} rm_s={med['rm']:.3f} trl_rm_s={med['trl_rm']:.3f} "
          f"rm_ratio={med['trl_rm'] / med['rm']:.2f} dpo_s={med['dpo']:.3f} trl_dpo_s={med['trl_dpo']:.3f} "
          f"dpo_ratio={med['trl_dpo'] / med['dpo']:.2f}")


if __name__ == "__main__":
    main()
