"""Soft-token attacks: the norm cap, the embedding substitution (in training and in both engine backends),
the objective against a reference computed from inputs_embeds, reproducibility, and a tiny run end to end."""
import json

import numpy as np
import pytest
import torch

from thinkforge import format as fmt
from thinkforge.attack import SOFT, AttackConfig, SoftPrompt, attack_loss, optimise, run_attack, target_answer
from thinkforge.config import ConfigError
from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import char_tokenizer, tiny_model
from thinkforge.tasks import get_task

TASK = get_task("add", digits=2, phrasing=True)


@pytest.fixture(scope="module")
def model_tok():
    tok = char_tokenizer(TASK.sample_text())
    model = tiny_model(tok, "micro", seed=0).eval().requires_grad_(False)
    return model, tok


def test_norm_cap_projects_only_the_vectors_above_it(model_tok):
    model, tok = model_tok
    soft = SoftPrompt(model, tok, 3, norm_cap=0.5, seed=0)
    mean_norm = model.get_input_embeddings().weight.norm(dim=1).mean()
    assert soft.max_norm == pytest.approx(float(0.5 * mean_norm))
    with torch.no_grad():
        soft.vectors[0] = torch.ones_like(soft.vectors[0]) * 10  # far above the cap
        soft.vectors[1] = soft.vectors[1] / soft.vectors[1].norm() * soft.max_norm * 0.3  # below it
    below = soft.vectors[1].clone()
    soft.project()
    norms = soft.vectors.detach().norm(dim=1)
    assert float(norms[0]) == pytest.approx(soft.max_norm, rel=1e-5) and torch.allclose(soft.vectors[1], below)
    assert torch.allclose(soft.vectors[0] / norms[0], torch.ones_like(soft.vectors[0]) / soft.vectors.shape[1] ** 0.5)
    assert (norms <= soft.max_norm * (1 + 1e-5)).all()


def test_soft_vectors_replace_exactly_the_placeholder_rows(model_tok):
    model, tok = model_tok
    soft = SoftPrompt(model, tok, 2, 1.0, seed=1)
    ids = torch.tensor([tok.encode(soft.message("12+34", "end"), add_special_tokens=False),
                        tok.encode(soft.message("56+78", "start"), add_special_tokens=False)])
    emb = model.get_input_embeddings()
    with soft.active(model):
        out = emb(ids)
    at = ids == tok.convert_tokens_to_ids(SOFT)
    assert at.sum() == 4
    assert torch.equal(out[at], soft.vectors.detach().repeat(2, 1))
    assert torch.equal(out[~at], emb.weight[ids[~at]])
    assert torch.equal(emb(ids), emb.weight[ids])  # the hook is gone after the block
    with soft.active(model), pytest.raises(ValueError, match="exactly 2 soft tokens"):
        emb(ids[:, :-1])  # the first row lost a placeholder


def test_attack_loss_equals_the_nll_from_inputs_embeds(model_tok):
    model, tok = model_tok
    chat = fmt.ChatFormat.of(tok)
    soft = SoftPrompt(model, tok, 3, 1.0, seed=2)
    problems = TASK.problems(3, "train")
    for goal, budgets in (("plus1", [0, 5, 100]), ("think-less", [0, 0, 0])):
        got = attack_loss(model, tok, soft, goal, problems, budgets, "end")
        total, count = 0.0, 0
        for p, b in zip(problems, budgets):  # the reference: one row at a time, the embeddings built by hand
            if goal == "think-less":
                head, target = "", "<think>\n</think>"
            else:
                thinking = tok.decode(tok.encode("\n".join(p.steps), add_special_tokens=False)[:b])
                head = "<think>\n" + thinking + ("\n" if thinking and not thinking.endswith("\n") else "") + "</think>\n"
                target = f"<answer>{int(p.answer) + 1}</answer>"
            prefix = tok.encode(chat.prompt(p.question + SOFT * 3) + head, add_special_tokens=False)
            tail = tok.encode(target, add_special_tokens=False)
            ids = torch.tensor([prefix + tail])
            embeds = model.get_input_embeddings().weight[ids].clone()
            embeds[ids == tok.convert_tokens_to_ids(SOFT)] = soft.vectors.detach()
            logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0].float(), -1)
            total -= sum(float(logp[len(prefix) + j - 1, t]) for j, t in enumerate(tail))
            count += len(tail)
        assert float(got) == pytest.approx(total / count, rel=1e-4), goal


def test_optimising_lowers_the_loss_and_is_a_function_of_the_seed(model_tok):
    model, tok = model_tok
    problems = TASK.problems(16, "train")
    cfg = AttackConfig(opt_steps=[0, 8], batch_size=8, lr=0.1, budgets=[0, 8])
    fixed = problems[:8]

    def run(seed):
        start = end = None
        for step, _, soft in optimise(model, tok, TASK, problems, "42", 2, cfg, seed):
            loss = float(attack_loss(model, tok, soft, "42", fixed, [0] * 8))
            start, end = (loss, end) if step == 0 else (start, loss)
        return start, end, soft.vectors.detach().clone()

    a, b = run(5), run(5)
    assert a[1] < a[0] - 0.01 and torch.equal(a[2], b[2])  # deterministic: a sign error would raise the loss
    assert not torch.equal(SoftPrompt(model, tok, 2, 1.0, 6).vectors, SoftPrompt(model, tok, 2, 1.0, 5).vectors)
    assert (a[2].norm(dim=1) <= SoftPrompt(model, tok, 2, 1.0, 0).max_norm * (1 + 1e-5)).all()


def test_both_engine_backends_see_the_soft_tokens(model_tok):
    model, tok = model_tok
    soft = SoftPrompt(model, tok, 4, 1.0, seed=3)
    with torch.no_grad():
        soft.vectors.mul_(0).add_(torch.randn(soft.vectors.shape, generator=torch.Generator().manual_seed(0)))
    chat = fmt.ChatFormat.of(tok)
    prompts = [chat.prompt(soft.message(p.question, "end")) for p in TASK.problems(3, "test")]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    run = lambda backend: [o for o in Engine(model, tok, backend=backend).generate(prompts, params)]  # noqa: E731
    plain = run("fast")
    with soft.active(model):
        fast, hf = run("fast"), run("hf")
    assert [o.ids for o in fast] == [o.ids for o in hf]
    for f, h, p in zip(fast, hf, plain):  # the same log-probabilities from both backends, not those without the vectors
        assert np.allclose(f.logprobs, h.logprobs, atol=1e-4) and not np.allclose(f.logprobs, p.logprobs, atol=1e-3)


def test_target_answers():
    assert [target_answer(g, "120") for g in ("42", "plus1", "times7")] == ["42", "121", "840"]


def test_tiny_attack_run_is_kept_and_refuses_another_config(tmp_path):
    cfg = AttackConfig(task_options={"digits": 2, "terms": 2, "phrasing": True}, out=str(tmp_path / "a"),
                       sft_steps=2, goals=["42", "think-less"], soft_tokens=[1], opt_steps=[0, 2], budgets=[0, 16],
                       batch_size=4, train_problems=8, eval_problems=5, max_new_tokens=20, threads=1)
    res = run_attack(cfg)
    assert set(res["attacks"]) == {"42/k=1", "think-less/k=1"}
    for pts in res["attacks"].values():
        assert [p["opt_steps"] for p in pts] == [0, 2] and set(pts[0]["budgets"]) == {"0", "16"}
    assert set(res["baseline"]["0"]["success"]) == {"42", "plus1", "times7", "think-less"}
    wrong = 1 - res["baseline"]["16"]["accuracy"]["mean"]
    assert res["baseline"]["16"]["success"]["think-less"]["mean"] == pytest.approx(wrong)
    stamp = (tmp_path / "a" / "points.json").stat().st_mtime_ns
    assert run_attack(cfg) == json.loads((tmp_path / "a" / "results.json").read_text())
    assert (tmp_path / "a" / "points.json").stat().st_mtime_ns == stamp  # a rerun trains nothing
    assert (tmp_path / "a" / "attack.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="another config"):
        run_attack(AttackConfig(**{**cfg.__dict__, "lr": 0.5}))
    np.testing.assert_equal(len(res["attacks"]["42/k=1"]), 2)
