import json
import math

import pytest
import torch
from resume_check import crash_then_resume

from thinkforge.config import ConfigError
from thinkforge.train.losses import LOSSES, group_advantages, k3_kl, shard_weight

# Two completions, two target positions. Ratios r = [[1.5, 1.0], [0.5, 9.0]], the last token masked out.
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])
OLD = torch.zeros(2, 2)
LOGP = torch.log(torch.tensor([[1.5, 1.0], [0.5, 9.0]]))


def test_losses_match_hand_computed_values():
    # Per-token surrogates -min(r A, clip(r) A), ε = 0.2:
    #   (0,0): r=1.5, A=1  -> -min(1.5, 1.2)  = -1.2      (DAPO, ε_high=0.28: -1.28)
    #   (0,1): r=1.0, A=1  -> -1.0
    #   (1,0): r=0.5, A=-2 -> -min(-1.0, -1.6) = +1.6
    expected = {
        "grpo": ((-1.2 - 1.0) / 2 + 1.6 / 1) / 2,  # per-sequence means, then the mean: 0.25
        "bnpo": (-1.2 - 1.0 + 1.6) / 3,  # over the 3 unmasked tokens: -0.2
        "dr_grpo": (-1.2 - 1.0 + 1.6) / (2 * 4),  # constant normaliser: 2 sequences x max_len 4
        "dapo": (-1.28 - 1.0 + 1.6) / 3,
        # GSPO: sequence ratios sqrt(1.5)=1.2247 -> clipped to 1.0004 (A=1), 0.5 -> 0.9997 (A=-2)
        "gspo": (-1.0004 + 2 * 0.9997) / 2,
    }
    assert set(expected) == set(LOSSES)
    for name, value in expected.items():
        got = LOSSES[name].loss(LOGP, OLD, ADV, MASK, max_len=4)
        assert float(got) == pytest.approx(value, abs=1e-6), name


def test_gradient_flows_only_through_unclipped_tokens():
    logp = LOGP.clone().requires_grad_(True)
    LOSSES["bnpo"].loss(logp, OLD, ADV, MASK).backward()
    # (0,0) is clipped (r=1.5 > 1.2 with A>0): no gradient; (0,1): d(-rA)/dlogp = -r A / 3 = -1/3;
    # (1,0) is clipped below (r=0.5 < 0.8 with A<0): no gradient; (1,1) masked.
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -1 / 3, 0.0, 0.0])


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 1.0])
    assert group_advantages(r, 2, "none").tolist() == [0.5, -0.5, 0.0, 0.0, 0.5, -0.5]
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert group_advantages(r, 2, "group", eps=0).tolist() == pytest.approx([0.5 / std, -0.5 / std, 0, 0, 0.5 / std, -0.5 / std])
    assert group_advantages(r, 2, "batch", eps=0).tolist() == pytest.approx(
        [x / float(r.std()) for x in [0.5, -0.5, 0.0, 0.0, 0.5, -0.5]])
    with pytest.raises(ValueError):
        group_advantages(r, 2, "global")


def test_k3_kl():
    d = -math.log(1.5)  # ref - logp
    assert float(k3_kl(torch.tensor(math.log(1.5)), torch.tensor(0.0))) == pytest.approx(math.exp(d) - d - 1)
    assert float(k3_kl(torch.tensor(-0.3), torch.tensor(-0.3))) == 0.0
    vals = torch.tensor([[1.0, 3.0], [2.0, 100.0]])
    assert float(LOSSES["grpo"].reduce(vals, MASK)) == pytest.approx((2.0 + 2.0) / 2)
    assert float(LOSSES["dapo"].reduce(vals, MASK)) == pytest.approx(6.0 / 3)


def test_bias_corrected_kl_by_hand():
    # LOGP vs OLD: token ratios [[1.5, 1.0], [0.5, 9.0]]; ref = old = 0, so d = -logp and
    # k3 = 1/r + ln r - 1: r=1.5 -> 0.0721318, r=1 -> 0, r=0.5 -> 0.3068528 (the masked token ignored).
    k3 = lambda r: 1 / r + math.log(r) - 1  # noqa: E731
    tok = LOSSES["dapo"].ratio(LOGP, OLD, MASK)
    got = LOSSES["dapo"].reduce(k3_kl(LOGP, OLD, tok), MASK)
    assert float(got) == pytest.approx((1.5 * k3(1.5) + 0.5 * k3(0.5)) / 3, abs=1e-6)
    seq = LOSSES["gspo"].ratio(LOGP, OLD, MASK)  # geometric means: sqrt(1.5), 0.5
    assert seq[:, 0].tolist() == pytest.approx([math.sqrt(1.5), 0.5], abs=1e-6)
    got = LOSSES["gspo"].reduce(k3_kl(LOGP, OLD, seq), MASK)
    assert float(got) == pytest.approx((math.sqrt(1.5) * k3(1.5) / 2 + 0.5 * k3(0.5)) / 2, abs=1e-6)
    logp = LOGP.clone().requires_grad_(True)  # the ratio carries gradient: d(k3 r)/dlogp at r=1.5, ref=old
    (k3_kl(logp, OLD, LOSSES["dapo"].ratio(logp, OLD, MASK)) * MASK).sum().backward()
    # k3 * r = 1 + r ln r - r = f(l) with r = e^l: f'(l) = r (ln r + 1) - r = r ln r
    assert float(logp.grad[0, 0]) == pytest.approx(1.5 * math.log(1.5), abs=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_weighted_shard_losses_sum_to_the_batch_loss(world):
    """Each process computes its rows' loss (rows rank, rank + world, …); weighted by ``shard_weight``,
    the shard losses (and so their gradients) sum to the whole batch's, for every variant and the KL."""
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(7, 5, generator=g) * 0.3, torch.randn(7, 5, generator=g) * 0.3
    adv, ref = torch.randn(7, generator=g), torch.randn(7, 5, generator=g) * 0.3
    mask = (torch.rand(7, 5, generator=g) > 0.3).float()
    mask[2] = 0.0  # a completion with no trained token
    for name, v in LOSSES.items():
        whole = v.loss(logp, old, adv, mask, max_len=5) + 0.1 * v.reduce(k3_kl(logp, ref), mask, 5)
        parts = 0.0
        for rank in range(world):
            r = slice(rank, None, world)
            part = v.loss(logp[r], old[r], adv[r], mask[r], max_len=5) + 0.1 * v.reduce(k3_kl(logp[r], ref[r]), mask[r], 5)
            parts += part * shard_weight(v, mask, r)
        assert float(parts) == pytest.approx(float(whole), abs=1e-6), name


# ---- the trainer -------------------------------------------------------------------------------

def sevens(completions, problems, **_):
    """A reward with variance even for an untrained model: the share of '7' characters."""
    return [c.count("7") / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    from thinkforge.train.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("sft") / "run"
    return str(train_sft(SFTConfig(task="add", task_options={"digits": 2}, size="micro", steps=15, batch_size=16,
                                   max_len=64, out=str(out), train_problems=200, save_every=15)) / "model")


def grpo_cfg(model, out, **kw):
    from thinkforge.train.grpo import GRPOConfig

    base = dict(model=model, task="add", task_options={"digits": 2}, out=str(out), steps=4, prompts_per_step=2,
                group_size=4, max_new_tokens=24, rewards={"test_grpo:sevens": 1.0}, dynamic_sampling=False,
                train_problems=50, save_every=2, lr=1e-3, warmup=1)
    return GRPOConfig(**{**base, **kw})


def test_grpo_smoke_changes_parameters_and_logs_metrics(sft_model, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.train.grpo import train_grpo

    run = train_grpo(grpo_cfg(sft_model, tmp_path / "g", beta=0.04, mu=2, loss="grpo"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
    for key in ("reward", "reward_std", "rewards/test_grpo:sevens/mean", "frac_reward_zero_std", "kl", "entropy",
                "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean", "step_time",
                "accuracy", "thinking_length", "reflection_share", "audit/verifier_timeouts"):
        assert key in rows[0], key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert rows[1]["reward"] == rows[0]["reward"]  # mu=2: the second step reuses the roll-outs
    before, _ = load_model(sft_model, device="cpu")
    after, _ = load_model(str(run / "model"), device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_grpo_resume_gives_the_same_rollouts_and_losses(sft_model, tmp_path, monkeypatch):
    from thinkforge.train import grpo

    crash_then_resume(monkeypatch, grpo, grpo.train_grpo, lambda out, **kw: grpo_cfg(sft_model, out, **kw), tmp_path)


def test_dynamic_sampling_keys_on_accuracy_not_shaped_reward(sft_model, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.rewards import Rewards
    from thinkforge.tasks import get_task
    from thinkforge.train.grpo import RolloutSource

    cfg = grpo_cfg(sft_model, tmp_path, dynamic_sampling=True, resample=False, prompts_per_step=2, group_size=2)
    model, tok = load_model(sft_model, device="cpu")
    task = get_task("add", digits=2)
    src = RolloutSource(cfg, model, tok, task, task.problems(20), "cpu")
    real = src._sample

    def fake(problems, seed):  # group 0: all wrong but format differs; group 1: one right, one wrong
        comps, probs, _ = real(problems, seed)
        return comps, probs, Rewards([0.1, 0.0, 1.1, 0.1], {"accuracy": [0.0, 0.0, 1.0, 0.0],
                                                          "format": [1.0, 0.0, 1.0, 1.0]}, [0.0, 0.0, 1.0, 0.0])

    src._sample = fake
    ro = src.collect({"epoch": 0, "cursor": 0, "batches": 0})
    assert ro.stats["groups_dropped"] == 1 and ro.ids.shape[0] == 2  # only group 1 is kept
    assert ro.adv.tolist() == pytest.approx([0.7071, -0.7071], abs=1e-3)
    assert ro.stats["audit/format_only_share"] == 0.5  # 2 of 4 completions: format reward while wrong


def test_grpo_config_errors(sft_model, tmp_path):
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        grpo_cfg(sft_model, tmp_path, group_size=1)
    with pytest.raises(ConfigError, match="loss must be one of"):
        grpo_cfg(sft_model, tmp_path, loss="ppo")


def test_no_update_when_every_group_is_dropped(sft_model, tmp_path):
    """All-wrong groups carry no signal: the step is logged, but the weights must not move (not even by
    AdamW's momentum)."""
    from thinkforge.models import load_model
    from thinkforge.train.grpo import train_grpo

    data = tmp_path / "impossible.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+{i}", "answer": "never-this"}) + "\n" for i in range(200)))
    run = train_grpo(grpo_cfg(sft_model, tmp_path / "g", task=str(data), task_options={}, dynamic_sampling=True,
                              resample=False, rewards={"accuracy": 1.0, "format": 0.5}, train_problems=20, steps=2))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["groups_dropped"] for r in rows] == [2, 2] and all(r["grad_norm"] == 0.0 for r in rows)
    before, _ = load_model(sft_model, device="cpu")
    after, _ = load_model(str(run / "model"), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


# ---- the trainer's loss function reads each variant's record -------------------------------------------

def _batch(model, n_rows=3, length=7, seed=0):
    """A roll-out batch whose sequence ratios are 0.99 (A<0), 1.01 (A>0) and 0.95 (A>0): inside PPO's
    ±0.2; GSPO's [1-3e-4, 1+4e-4] clips the first two (the third is below 1 with A>0: never clipped)."""
    from thinkforge.models import token_logprobs

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n_rows, length), generator=g)
    mask = torch.ones(n_rows, length - 1)
    mask[:, :2] = 0  # the prompt
    mask[2, -1] = 0
    with torch.no_grad():
        logp = token_logprobs(model, ids, 1.0)[0]
    shift = torch.tensor([0.01, -0.01, 0.05, 0.02, -0.03])[:n_rows, None]
    old = logp + shift * mask  # log ratio = -shift on every trained token
    adv = torch.tensor([-1.0, 1.0, 0.5, 1.0, -1.0])[:n_rows]
    return {"rollouts": {"ids": ids, "mask": mask, "old_logp": old, "adv": adv, "stats": {}}}, logp


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_trainer_loss_is_the_variants_loss_with_its_own_bounds_and_kl(sft_model, tmp_path, name, correction):
    from thinkforge.models import load_model, token_logprobs
    from thinkforge.train.grpo import make_loss_fn

    model, _ = load_model(sft_model, device="cpu")
    ref, _ = load_model(sft_model, device="cpu")
    with torch.no_grad():
        next(ref.parameters()).mul_(0.9)  # a reference that differs, so the KL term is not 0
    cfg = grpo_cfg(sft_model, tmp_path, loss=name, beta=0.1, kl_bias_correction=correction)
    mb, logp = _batch(model)
    loss, stats = make_loss_fn(cfg, ref)(model, mb)
    ro, v = mb["rollouts"], LOSSES[name]
    with torch.no_grad():
        ref_logp = token_logprobs(ref, ro["ids"], 1.0)[0]
    ratio = v.ratio(logp, ro["old_logp"], ro["mask"]) if correction else None
    kl = v.reduce(k3_kl(logp, ref_logp, ratio), ro["mask"], cfg.max_new_tokens)
    expected = v.loss(logp, ro["old_logp"], ro["adv"], ro["mask"], max_len=cfg.max_new_tokens) + 0.1 * kl
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert stats["kl"] == pytest.approx(float(kl), rel=1e-5) and float(kl) > 0
    # GSPO clips both moved sequences at its own bounds (all their tokens); PPO's ±0.2 clips none.
    clipped_tokens = float(ro["mask"][:2].sum()) if name == "gspo" else 0.0
    assert stats["clip_ratio/region_mean"] * float(ro["mask"].sum()) == pytest.approx(clipped_tokens)


@pytest.mark.parametrize("name", list(LOSSES))
def test_rows_with_zero_advantage_are_not_computed_and_the_update_is_the_same(sft_model, tmp_path, name, monkeypatch):
    """With beta 0, rows whose advantage is 0 get no forward or backward (in one pass and in token-budget
    parts), and the loss and gradients equal the variant's loss over every row; with a KL term every row is
    computed."""
    from thinkforge.models import load_model, token_logprobs
    from thinkforge.train import grpo

    model, _ = load_model(sft_model, device="cpu")
    mb, _ = _batch(model, n_rows=5)
    ro = mb["rollouts"]
    ro["adv"] = torch.tensor([-1.0, 0.0, 0.5, 0.0, 2.0])
    ro["mask"][1] = ro["mask"][0]  # (every row has tokens in the normaliser)
    logp = token_logprobs(model, ro["ids"], 1.0)[0]
    v = LOSSES[name]
    expected = v.loss(logp, ro["old_logp"], ro["adv"], ro["mask"], max_len=24)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    seen = []
    monkeypatch.setattr(grpo, "token_logprobs", lambda m, ids, *a, **k: (seen.append(ids.shape[0]), token_logprobs(m, ids, *a, **k))[1])
    for tokens, parts in ((0, 1), (12, 3)):
        cfg = grpo_cfg(sft_model, tmp_path, loss=name, beta=0.0, micro_batch_tokens=tokens)
        assert grpo.live_rows(ro, cfg) == [0, 2, 4]
        loss_fn, total, seen[:] = grpo.make_loss_fn(cfg), 0.0, []
        model.zero_grad()
        for k in range(parts):
            loss, _ = loss_fn(model, {**mb, "part": k, "parts": parts})
            loss.backward()
            total += float(loss.detach())
        assert sum(seen) == 3 and len(seen) == parts  # rows 1 and 3 never computed
        assert total == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
        assert max((want[n] - p.grad).abs().max().item() for n, p in model.named_parameters()) < 1e-6
    assert grpo.live_rows(ro, grpo_cfg(sft_model, tmp_path, beta=0.04)) == [0, 1, 2, 3, 4]
    assert grpo.live_rows(ro, grpo_cfg(sft_model, tmp_path, skip_zero_advantage=False)) == [0, 1, 2, 3, 4]
    ro["adv"] = torch.zeros(5)
    assert grpo.make_loss_fn(grpo_cfg(sft_model, tmp_path, loss=name))(model, mb)[0] is None  # nothing to learn


def test_gspo_defaults_are_gspos_and_a_config_bound_overrides_one():
    assert LOSSES["gspo"].bounds() == (3e-4, 4e-4) and LOSSES["dapo"].bounds() == (0.2, 0.28)
    assert LOSSES["gspo"].bounds(eps_high=0.01) == (3e-4, 0.01)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_variant_trains_with_kl_correction_and_overlong_masking(sft_model, tmp_path, name):
    from thinkforge.models import load_model
    from thinkforge.train.grpo import train_grpo

    run = train_grpo(grpo_cfg(sft_model, tmp_path / name, loss=name, steps=2, mu=2, beta=0.04, kl_bias_correction=True,
                              mask_truncated=True, max_new_tokens=16))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    before, _ = load_model(sft_model, device="cpu")
    after, _ = load_model(str(run / "model"), device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_mask_truncated_drops_completions_that_hit_the_cap(sft_model, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.tasks import get_task
    from thinkforge.train.grpo import RolloutSource

    model, tok = load_model(sft_model, device="cpu")
    task = get_task("add", digits=2)
    trained_rows = {}
    for flag in (False, True):
        cfg = grpo_cfg(sft_model, tmp_path, max_new_tokens=3, mask_truncated=flag)  # 3 tokens: most rows truncated
        ro = RolloutSource(cfg, model, tok, task, task.problems(20), "cpu").collect({"epoch": 0, "cursor": 0, "batches": 0})
        finished = round(8 * (1 - ro.stats["completions/clipped_ratio"]))
        trained_rows[flag] = (int((ro.mask.sum(1) > 0).sum()), finished)
    assert trained_rows[False][0] == 8  # every completion trains
    assert trained_rows[True][0] == trained_rows[True][1] < 8  # only those that ended before the cap


def test_resampling_refills_dropped_groups(sft_model, tmp_path):
    from thinkforge.models import load_model
    from thinkforge.rewards import Rewards
    from thinkforge.tasks import get_task
    from thinkforge.train.grpo import RolloutSource

    model, tok = load_model(sft_model, device="cpu")
    task = get_task("add", digits=2)
    kept = {}
    for resample in (False, True):
        cfg = grpo_cfg(sft_model, tmp_path, dynamic_sampling=True, resample=resample, max_resample=3, group_size=2)
        src = RolloutSource(cfg, model, tok, task, task.problems(20), "cpu")
        real, calls = src._sample, []

        def fake(problems, seeds, real=real, calls=calls):  # round 1: all groups flat; later: one of two varies
            comps, probs, _ = real(problems, seeds)
            calls.append(len(problems))
            acc = [0.0] * len(comps) if len(calls) == 1 else [1.0, 0.0] + [0.0] * (len(comps) - 2)
            return comps, probs, Rewards(acc, {"accuracy": acc}, acc)

        src._sample = fake
        ro = src.collect({"epoch": 0, "cursor": 0, "batches": 0})
        kept[resample] = (0 if ro.ids is None else ro.ids.shape[0] // 2, ro.stats["sampling_rounds"], calls)
    assert kept[False] == (0, 1, [2])  # no refill: the flat round leaves nothing
    assert kept[True] == (2, 3, [2, 2, 1])  # refilled: 1 group from round 2, 1 from round 3


def test_resume_with_mu_2_restores_the_pending_rollouts(sft_model, tmp_path, monkeypatch):
    """Killed at the 4th loss computation = the second pass over the second roll-out batch, after a
    checkpoint taken between the passes: the checkpoint carries the batch, and the resumed run's second
    pass trains on the same roll-outs as the uninterrupted run's."""
    from thinkforge.train import grpo

    crash_then_resume(monkeypatch, grpo, grpo.train_grpo,
                      lambda out, **kw: grpo_cfg(sft_model, out, mu=2, save_every=1, beta=0.04, **kw), tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_token_logprobs_never_build_the_full_logits_and_equal_the_direct_path(char_tok, tie):
    """Values, entropies and every parameter's gradient equal log_softmax over the full (N, L, V) logits,
    while the model's head only ever sees one position per row (the rest goes through 7-row blocks)."""
    from thinkforge.models import tiny_model, token_logprobs

    m = tiny_model(char_tok, "micro", tie_word_embeddings=tie)
    ids = torch.randint(5, 100, (3, 11))
    weights = torch.arange(30).view(3, 10).float().sin()
    logits = m(input_ids=ids).logits[:, :-1].float() / 0.7
    full = torch.log_softmax(logits, -1)
    direct, direct_entropy = full.gather(-1, ids[:, 1:, None])[..., 0], -(full.exp() * full).sum(-1)
    (direct * weights).sum().backward()
    direct_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    seen = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    logp, entropy = token_logprobs(m, ids, 0.7, with_entropy=True, rows=7)
    (logp * weights).sum().backward()
    assert seen == [(3, 1, m.config.hidden_size)]
    assert (logp - direct).abs().max() < 1e-5 and (entropy - direct_entropy).abs().max() < 1e-5
    assert not entropy.requires_grad
    assert max((direct_grads[n] - p.grad).abs().max().item() for n, p in m.named_parameters()) < 1e-5


def test_token_parts_and_needed_lengths_by_hand():
    from thinkforge.train.grpo import needed_lengths, token_parts

    mask = torch.zeros(5, 9)  # targets of ids of width 10
    mask[0, 2:9] = 1  # last target 8: needs all 10 ids
    mask[1, 2:5] = 1  # last target 4: 6 ids
    mask[2, 2:7] = 1
    mask[2, 5] = 0  # a forced token inside: still up to target 6, 8 ids
    mask[4, 2:4] = 1  # 5 ids; row 3 has no sampled token (a truncated row under mask_truncated): 2
    assert needed_lengths(mask).tolist() == [10, 6, 8, 2, 5]
    # one process, longest first: [0] (10; 2 x 10 > 16), [2, 1] (2 x 8 <= 16; 3 x 8 > 16), [4, 3]
    assert token_parts(mask, 1, 16) == [[[0], [1, 2], [3, 4]]]
    # budget 8: row 0 needs more than it (a part alone); no two rows fit (2 x 5 > 8 for the last two)
    assert token_parts(mask, 1, 8) == [[[0], [2], [1], [4], [3]]]
    assert token_parts(mask, 1, 10) == [[[0], [2], [1], [3, 4]]]  # 2 x 5 <= 10
    assert token_parts(mask, 1, 100) == [[[0, 1, 2, 3, 4]]]
    # two processes: rows 0, 2, 4 and 1, 3, each packed on its own
    assert token_parts(mask, 2, 16) == [[[0], [2, 4]], [[1, 3]]]


@pytest.mark.parametrize("name", list(LOSSES))
def test_micro_batches_give_the_same_update_and_stats(sft_model, tmp_path, name):
    """--micro-batch-size 1 and 2 (3 and 2 forward/backward passes) and --micro-batch-tokens 14 and 5 (parts
    [0, 1] + [2] cut to its 4 needed ids, and one row each) against the whole batch at once, with the KL term
    and its bias correction: the same gradients to float tolerance, and the same logged stats once the loop
    averages them over micro-batches."""
    from thinkforge.models import load_model
    from thinkforge.train.grpo import make_loss_fn, token_parts

    model, _ = load_model(sft_model, device="cpu")
    ref, _ = load_model(sft_model, device="cpu")
    with torch.no_grad():
        next(ref.parameters()).mul_(0.9)
    mb, _ = _batch(model)
    mb["rollouts"]["mask"][2, 3:] = 0  # row 2 needs 4 of the 7 ids: a part of its own is cut short
    results = []
    for size, tokens in ((0, 0), (1, 0), (2, 0), (0, 14), (0, 5)):
        cfg = grpo_cfg(sft_model, tmp_path, loss=name, beta=0.1, kl_bias_correction=True, micro_batch_size=size,
                       micro_batch_tokens=tokens)
        parts = len(token_parts(mb["rollouts"]["mask"], 1, tokens)[0]) if tokens else 1 if size == 0 else -(-3 // size)
        assert parts == {(0, 14): 2, (0, 5): 3}.get((size, tokens), parts)
        loss_fn, stats = make_loss_fn(cfg, ref), {}
        model.zero_grad()
        for k in range(parts):  # what the loop does with the list the roll-out source returns
            loss, s = loss_fn(model, {**mb, "part": k, "parts": parts})
            loss.backward()
            for key, v in s.items():
                stats[key] = stats.get(key, 0.0) + v / parts
        results.append(({n: p.grad.clone() for n, p in model.named_parameters()}, stats))
    (g0, s0), *rest = results
    for g, s in rest:
        assert max((g0[n] - g[n]).abs().max().item() for n in g0) < 1e-6
        assert s.keys() == s0.keys() and all(s[k] == pytest.approx(s0[k], rel=1e-5, abs=1e-7) for k in s0)
    assert max(v.abs().max().item() for v in g0.values()) > 0


def test_grpo_with_micro_batches_trains_the_same_model(sft_model, tmp_path):
    """End to end through the loop: 8 roll-outs per step in micro-batches of 3 (3 passes) against one pass."""
    from thinkforge.models import load_model
    from thinkforge.train import grpo
    from thinkforge.train.grpo import train_grpo

    calls, make = [], grpo.make_loss_fn

    def counting(cfg, ref=None):
        fn = make(cfg, ref)
        return lambda model, mb: (calls.append((cfg.micro_batch_size, cfg.micro_batch_tokens)), fn(model, mb))[1]

    grpo.make_loss_fn = counting
    try:
        runs = [train_grpo(grpo_cfg(sft_model, tmp_path / f"m{m}t{t}", steps=2, beta=0.04, micro_batch_size=m,
                                    micro_batch_tokens=t)) for m, t in ((0, 0), (3, 0), (0, 80))]
    finally:
        grpo.make_loss_fn = make
    assert calls.count((0, 0)) == 2 and calls.count((3, 0)) == 2 * 3  # 8 roll-outs a step: 1 pass, or 3 + 3 + 2
    assert calls.count((0, 80)) >= 2 * 3  # rows of ~30 ids: at most 2 in 80 tokens
    metrics = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    for other in metrics[1:]:
        for a, b in zip(metrics[0], other):
            for key in ("loss", "kl", "entropy", "reward", "grad_norm"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    m0, *ms = (load_model(str(r / "model"), device="cpu")[0] for r in runs)
    for m in ms:
        assert max((x - y).abs().max().item() for x, y in zip(m0.state_dict().values(), m.state_dict().values())) < 1e-5


# ---- one-step-off roll-outs (train.async_rollouts) -------------------------------------------------------

def _without_timing(run):
    skip = ("step_time", "tokens_per_s", "gen_time", "rollout/lag")
    return [{k: v for k, v in json.loads(r).items() if k not in skip} for r in (run / "metrics.jsonl").read_text().splitlines()]


def test_async_rollouts_at_lag_0_give_the_same_run_as_synchronous_grpo(sft_model, tmp_path):
    """The sampler process with no overlap makes exactly the batches the trainer would: same metrics, same
    weights (one thread on each side, so the arithmetic is the same)."""
    from thinkforge.models import load_model
    from thinkforge.train.grpo import train_grpo

    sync = train_grpo(grpo_cfg(sft_model, tmp_path / "sync", threads=1, steps=3))
    lag0 = train_grpo(grpo_cfg(sft_model, tmp_path / "lag0", threads=1, steps=3, async_rollouts=True, rollout_lag=0))
    assert _without_timing(lag0) == _without_timing(sync)
    assert [json.loads(r)["rollout/lag"] for r in (lag0 / "metrics.jsonl").read_text().splitlines()] == [0, 0, 0]
    a, _ = load_model(str(sync / "model"), device="cpu")
    b, _ = load_model(str(lag0 / "model"), device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_async_rollouts_sample_the_next_batch_with_the_weights_before_the_update(sft_model, tmp_path, monkeypatch):
    """Lag 1: the second batch's old logprobs are the starting weights' (it was sampled while the first step
    trained), not those of the weights it is trained with; the loss's ratio is taken against them."""
    from thinkforge.models import load_model, token_logprobs
    from thinkforge.train import grpo

    start, _ = load_model(sft_model, device="cpu")
    seen, real = [], grpo.make_loss_fn

    def recording(*args):
        fn = real(*args)

        def wrapped(model, mb):
            ro = mb["rollouts"]
            with torch.no_grad():
                now = token_logprobs(model, ro["ids"], 1.0)[0]
                then = token_logprobs(start, ro["ids"], 1.0)[0]
            m = ro["mask"].bool()
            seen.append((float((then - ro["old_logp"])[m].abs().max()), float((now - ro["old_logp"])[m].abs().max())))
            return fn(model, mb)

        return wrapped

    monkeypatch.setattr(grpo, "make_loss_fn", recording)
    run = grpo.train_grpo(grpo_cfg(sft_model, tmp_path / "g", steps=2, save_every=2, async_rollouts=True))
    lags = [json.loads(r)["rollout/lag"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert lags == [0, 1]
    (start0, now0), (start1, now1) = seen
    assert start0 < 1e-5 and now0 < 1e-5  # batch 0: sampled and trained by the starting weights
    assert start1 < 1e-5 and now1 > 1e-3  # batch 1: sampled by the starting weights, trained one update later


def test_async_rollouts_resume_exactly(sft_model, tmp_path, monkeypatch):
    """Killed after a checkpoint, resumed: the same metrics (lags included: 0, 1, 0, 1 with a checkpoint
    every 2 steps, which is sampled synchronously so nothing is in flight when it is written)."""
    from thinkforge.train import grpo

    crash_then_resume(monkeypatch, grpo, grpo.train_grpo,
                      lambda out, **kw: grpo_cfg(sft_model, out, async_rollouts=True, **kw), tmp_path)
    lags = [json.loads(r)["rollout/lag"] for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert lags == [0, 1, 0, 1]


def test_async_rollouts_refuse_what_they_cannot_do(sft_model, tmp_path):
    from thinkforge.config import ConfigError

    with pytest.raises(ConfigError, match="full model"):
        grpo_cfg(sft_model, tmp_path / "g", async_rollouts=True, lora_r=4)
    with pytest.raises(ConfigError, match="rollout_lag"):
        grpo_cfg(sft_model, tmp_path / "g", async_rollouts=True, rollout_lag=2)
