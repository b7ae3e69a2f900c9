"""LoRA through peft: only adapters train, the engine generates with them, checkpoints hold the adapter and
resume exactly, the merged model equals the adapted one, and the KL reference is the base (adapter off)."""
import json

import pytest
import torch

from thinkforge.generation import Engine, SamplingParams
from thinkforge.models import add_lora, base_only, is_lora, load_model, save_model
from thinkforge.train import sft
from thinkforge.train.sft import SFTConfig, train_sft

LORA = dict(lora_r=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory, char_tok):
    """A micro model briefly SFT-trained on 2-digit addition: the base the adapters go on."""
    out = tmp_path_factory.mktemp("lora") / "base"
    run = train_sft(SFTConfig(task="add", task_options={"digits": 2}, size="micro", steps=30, batch_size=16, max_len=64,
                              out=str(out), train_problems=300, save_every=30, lr=3e-3))
    return str(run / "model")


def small(base, out, **kw):
    cfg = dict(task="add", task_options={"digits": 2}, model=base, steps=4, batch_size=8, max_len=64, save_every=2,
               out=str(out), train_problems=100, lr=1e-2, warmup=1, **LORA)
    return SFTConfig(**{**cfg, **kw})


def _state(folder):
    model, _ = load_model(folder, device="cpu")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lora_sft_trains_only_adapters_and_merges_exactly(base, tmp_path):
    run = train_sft(small(base, tmp_path / "a"))
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (run / "checkpoint" / "adapter_model.safetensors").is_file()  # checkpoints hold the adapter only
    adapted, tok = load_model(str(adapter), device="cpu")
    assert is_lora(adapted)
    merged, _ = load_model(str(run / "model"), device="cpu")  # a plain HF model
    assert not is_lora(merged) and (run / "model" / "config.json").is_file()
    before = _state(base)
    after = merged.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # norms and embeddings untouched
    ids = torch.tensor([tok.encode("<|im_start|>user\n12+34<|im_end|>\n<|im_start|>assistant\n<think>")])
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
        with base_only(adapted):  # the adapter off: the base exactly
            base_model, _ = load_model(base, device="cpu")
            assert torch.equal(adapted(input_ids=ids).logits, base_model(input_ids=ids).logits)


def test_lora_resume_continues_exactly(base, tmp_path, monkeypatch):
    full = train_sft(small(base, tmp_path / "a"))
    calls = {"n": 0}
    real = sft.sft_loss

    def crashing(model, mb):  # dies during step 4, after the checkpoint of step 2
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(model, mb)

    monkeypatch.setattr(sft, "sft_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_sft(small(base, tmp_path / "b"))
    monkeypatch.setattr(sft, "sft_loss", real)
    resumed = train_sft(small(base, tmp_path / "b", resume=True))
    strip = lambda p: [{k: v for k, v in json.loads(r).items() if k not in ("step_time", "tokens_per_s")}
                       for r in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(resumed) == strip(full)
    a, b = _state(str(full / "adapter")), _state(str(resumed / "adapter"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_generates_with_the_adapter_on_both_backends(base, char_tok):
    model, tok = load_model(base, device="cpu")
    model = add_lora(model, base, r=4, alpha=8.0)
    with torch.no_grad():  # a non-zero adapter (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    prompt = ["<|im_start|>user\n12+34<|im_end|>\n<|im_start|>assistant\n"]
    params = SamplingParams(temperature=0, max_new_tokens=16)
    fast = Engine(model, tok, backend="fast").generate(prompt, params)[0]
    hf = Engine(model, tok, backend="hf").generate(prompt, params)[0]
    assert fast.ids == hf.ids
    full = torch.tensor([fast.prompt_ids + fast.ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=full).logits[0, len(fast.prompt_ids) - 1 : -1], -1)
    direct = logp.gather(-1, torch.tensor(fast.ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(fast.logprobs), direct, atol=1e-4)
    plain, _ = load_model(base, device="cpu")
    base_out = Engine(plain, tok, backend="fast").generate(prompt, params)[0]
    with base_only(model):
        off = Engine(model, tok, backend="fast").generate(prompt, params)[0]
    assert off.ids == base_out.ids and off.ids != fast.ids


def length_reward(completions, problems, **_):
    """A reward that differs within every group, so each step has a gradient."""
    return [len(c) / 50 for c in completions]


def test_lora_grpo_kl_reference_is_the_base_and_dpo_trains(base, tmp_path):
    from thinkforge.train.grpo import GRPOConfig, train_grpo

    run = train_grpo(GRPOConfig(task="add", task_options={"digits": 2}, model=base, steps=2, prompts_per_step=2,
                                group_size=4, max_new_tokens=24, out=str(tmp_path / "g"), save_every=2, beta=0.1,
                                lr=1e-2, warmup=1, dynamic_sampling=False, rewards={"test_lora:length_reward": 1.0},
                                **LORA))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the adapter starts as the identity (B = 0): the policy is the base, so the first KL is exactly 0
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "model" / "config.json").is_file()

    from thinkforge.train.dpo import DPOConfig, train_dpo

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}", "chosen": f"<answer>{a + b}</answer>",
                                        "rejected": f"<answer>{a + b + 1}</answer>"}) + "\n"
                            for a, b in [(12, 30), (41, 7), (25, 25), (60, 13)]))
    d = train_dpo(DPOConfig(data=str(data), model=base, steps=3, batch_size=4, out=str(tmp_path / "d"), save_every=3,
                            lr=1e-2, warmup=1, eval_problems=0, **LORA))
    drows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert drows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at the start: -log σ(0)
    assert drows[-1]["loss"] < drows[0]["loss"]


def test_lora_refuses_a_random_start_and_unknown_targets(base):
    from thinkforge.config import ConfigError

    with pytest.raises(ConfigError, match="LoRA adapts a trained model"):
        SFTConfig(model="tiny", lora_r=4)
    model, _ = load_model(base, device="cpu")
    with pytest.raises(ValueError, match="qq_proj"):
        add_lora(model, base, r=4, alpha=8.0, targets="q_proj,qq_proj")


def test_save_model_of_a_lora_model_writes_the_adapter(base, tmp_path):
    model, tok = load_model(base, device="cpu")
    model = add_lora(model, base, r=2, alpha=4.0, targets="q_proj,v_proj")
    out = save_model(model, tok, tmp_path / "ad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    reloaded, _ = load_model(str(out), device="cpu")
    assert is_lora(reloaded)
    trainable, _ = load_model(str(out), device="cpu", trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_preference_reward_model_trains_adapters_and_head(base, tmp_path):
    from thinkforge.scorers import RewardModel
    from thinkforge.train.reward_model import RMConfig, train_reward_model

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}", "chosen": f"<answer>{a + b}</answer>",
                                        "rejected": f"<answer>{a + b + 1}</answer>"}) + "\n"
                            for a in range(10, 40, 3) for b in (7, 21)))
    cfg = dict(kind="preference", data=str(data), policy=base, steps=3, batch_size=8, out=str(tmp_path / "rm"),
               save_every=3, lr=1e-2, warmup=1, eval_share=0.2, **LORA)
    run = train_reward_model(RMConfig(**cfg))
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "eval.json").is_file()
    rm = RewardModel.load(str(run / "model"), "cpu")  # merged: a plain token-classification checkpoint
    before = _state(base)
    after = rm.model.state_dict()
    moved = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("_proj.weight") for k in moved)  # the backbone moved only through adapters
    assert float(after["score.bias"].abs().max()) == 0.0  # the offset the BT loss cannot see stays 0
    from thinkforge.config import ConfigError

    with pytest.raises(ConfigError, match="extra-layers"):
        train_reward_model(RMConfig(**{**cfg, "extra_layers": 1, "out": str(tmp_path / "x")}))
