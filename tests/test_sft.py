import json

import pytest
import torch

from thinkforge import format as fmt
from thinkforge.config import ConfigError
from thinkforge.models import tiny_model
from thinkforge.tasks import get_task
from thinkforge.train import sft
from thinkforge.train.sft import Batcher, SFTConfig, completion_text, encode_pairs, sft_loss, train_sft


def small(tmp_path, **kw):
    base = dict(task="add", task_options={"digits": 2}, size="micro", train_problems=300, steps=6, batch_size=8,
                max_len=64, save_every=3, out=str(tmp_path / "run"), warmup=2, lr=3e-3)
    return SFTConfig(**{**base, **kw})


def test_packed_loss_equals_unpacked_loss(char_tok):
    task = get_task("add", digits=2)
    chat = fmt.ChatFormat.of(char_tok)
    pairs = [(chat.prompt(p.question), completion_text(p, "cot", chat)) for p in task.problems(12)]
    examples = encode_pairs(pairs, char_tok, 128)
    total = sum(len(ids) for ids, _ in examples)
    model = tiny_model(char_tok, "micro", seed=0)
    totals = {}
    for packing in (True, False):  # packed: all 12 examples in one row; unpacked: one per row
        cfg = SFTConfig(batch_size=1 if packing else 12, max_len=total, packing=packing, seed=0)
        mb = Batcher(examples, cfg, char_tok.pad_token_id, "cpu")({})[0]
        with torch.no_grad():
            loss, _ = sft_loss(model, mb)
        totals[packing] = (float(loss), mb["n_tokens"], mb["input_ids"].numel())
    assert totals[True][1] == totals[False][1]  # the same supervised tokens
    assert totals[True][0] == pytest.approx(totals[False][0], rel=1e-5)
    assert totals[True][2] < totals[False][2]  # but fewer token slots computed


def test_loss_in_head_blocks_equals_full_logits_cross_entropy(char_tok, monkeypatch):
    """The output head applied 16 labelled positions at a time (no (tokens x vocab) logits) gives the loss,
    gradients and token accuracy of cross-entropy over the full logits."""
    from thinkforge import models

    monkeypatch.setattr(models, "LOGIT_BLOCK_BYTES", 1)  # blocks of logit_rows' floor: 16 positions
    task = get_task("add", digits=2)
    chat = fmt.ChatFormat.of(char_tok)
    pairs = [(chat.prompt(p.question), completion_text(p, "cot", chat)) for p in task.problems(6)]
    mb = Batcher(encode_pairs(pairs, char_tok, 128), SFTConfig(batch_size=6, max_len=128, packing=False, seed=0),
                 char_tok.pad_token_id, "cpu")({})[0]
    assert mb["n_tokens"] > 3 * 16  # several blocks
    model = tiny_model(char_tok, "micro", seed=0)
    loss, stats = sft_loss(model, mb)
    loss.backward()
    mine = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                   position_ids=mb["position_ids"]).logits[:, :-1]
    targets = mb["labels"][:, 1:]
    sel = targets != -100
    ref = torch.nn.functional.cross_entropy(logits[sel], targets[sel], reduction="sum")
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert stats["token_accuracy"] == pytest.approx(float((logits[sel].argmax(-1) == targets[sel]).float().mean()))
    for g, p in zip(mine, model.parameters()):  # float sums in another order: relative to the tensor's scale
        assert (g - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-9


def test_completion_only_labels(char_tok):
    (ids, labels), = encode_pairs([("PROMPT", "<answer>5</answer><|im_end|>")], char_tok, 64)
    assert labels[:6] == [-100] * 6 and labels[6:] == ids[6:] and len(ids) == 6 + 4


def test_sft_smoke_loss_falls_and_parameters_change(tmp_path):
    run = train_sft(small(tmp_path, steps=30, save_every=30))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    from thinkforge.models import load_model

    trained, tok = load_model(str(run / "model"), device="cpu")
    init = tiny_model(tok, "micro", seed=0)
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), init.state_dict().values())]
    assert all(changed)
    assert (run / "config.toml").read_text().count("steps = 30") == 1


def test_resume_continues_exactly(tmp_path, monkeypatch):
    full = train_sft(small(tmp_path / "a"))
    expected = (full / "metrics.jsonl").read_text().splitlines()

    calls = {"n": 0}
    real = sft.sft_loss

    def crashing(model, mb):  # dies during step 5, after the checkpoint of step 3
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(model, mb)

    monkeypatch.setattr(sft, "sft_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_sft(small(tmp_path / "b"))
    monkeypatch.setattr(sft, "sft_loss", real)
    run = tmp_path / "b" / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ConfigError, match="--resume"):
        train_sft(small(tmp_path / "b"))
    train_sft(small(tmp_path / "b", resume=True))
    got = (run / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("step_time", "tokens_per_s")} for r in rows]
    assert strip(got) == strip(expected)  # same batches, same losses, bit for bit
    a = torch.load(full / "checkpoint" / "trainer_state.pt", weights_only=False)
    b = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert a["data"] == b["data"] and a["step"] == b["step"] == 6


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    real = sft.sft_loss

    def nan_loss(model, mb):
        loss, stats = real(model, mb)
        return loss * float("nan"), stats

    monkeypatch.setattr(sft, "sft_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="step 0: non-finite loss"):
        train_sft(small(tmp_path))


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    import collections

    from thinkforge.train import loop

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))
    with pytest.raises(ConfigError, match=r"0.1 MB free on this disk, training needs about [\d.]+ MB"):
        train_sft(small(tmp_path))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    """The disk fills up at the second save: a clear error, the step-2 checkpoint whole and resumable, no
    temporary folder left behind."""
    import errno

    from thinkforge.train import loop

    real, calls = loop.torch.save, {"n": 0}

    def filling(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(loop.torch, "save", filling)
    with pytest.raises(RuntimeError, match=r"step 4: could not write the checkpoint \(No space left on device\); "
                                           r"the previous checkpoint in .* is intact"):
        train_sft(small(tmp_path, steps=6, save_every=2))
    monkeypatch.setattr(loop.torch, "save", real)
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 2
    assert not list(run.glob(".checkpoint.*"))
    train_sft(small(tmp_path, steps=6, save_every=2, resume=True))
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 6


def test_mixed_traces_give_cot_to_the_asked_share(tmp_path):
    from thinkforge.train.sft import traces

    kinds = traces(small(tmp_path, trace="mixed", cot_share=0.2, train_problems=2000))
    assert set(kinds) == {"cot", "direct"} and abs(kinds.count("cot") / 2000 - 0.2) < 0.03  # ~4 standard errors
    assert kinds == traces(small(tmp_path, trace="mixed", cot_share=0.2, train_problems=2000))  # seeded
    assert traces(small(tmp_path, trace="mixed", cot_share=0.0)) == ["direct"] * 300
    with pytest.raises(ConfigError, match=r"cot_share must be in \[0, 1\]"):
        small(tmp_path, trace="mixed", cot_share=1.5)


def test_too_long_example_is_an_error_not_a_cut(tmp_path):
    with pytest.raises(ConfigError, match=r"example 0 has \d+ tokens, more than max_len=20"):
        train_sft(small(tmp_path, max_len=20))


def test_cot_needs_gold_steps(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(ConfigError, match="has no gold steps"):
        train_sft(small(tmp_path, task=str(f), task_options={}))


def test_recovery_from_a_kill_between_the_two_renames(tmp_path):
    """A kill after the old checkpoint was moved aside but before the new one was renamed in."""
    import os

    from thinkforge.train.loop import recover_checkpoint

    train_sft(small(tmp_path, steps=3, save_every=3))
    run = tmp_path / "run"
    os.rename(run / "checkpoint", run / ".checkpoint.old")  # the state the kill leaves
    (run / ".checkpoint.abc123").mkdir()  # and a half-written temporary folder
    recover_checkpoint(run)
    assert (run / "checkpoint" / "trainer_state.pt").exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    train_sft(small(tmp_path, steps=4, save_every=3, resume=True))  # and the run resumes from it
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_grad_accum_gives_the_same_update_as_one_batch(tmp_path):
    """4 micro-batches of 2 rows accumulate to the update of one batch of 8 (the loss is divided by the
    step's token count, not each micro-batch's)."""
    from thinkforge.models import load_model

    whole = train_sft(small(tmp_path / "one", steps=3, save_every=3))
    accum = train_sft(small(tmp_path / "four", steps=3, save_every=3, grad_accum=4))
    a, _ = load_model(str(whole / "model"), device="cpu")
    b, _ = load_model(str(accum / "model"), device="cpu")
    diffs = [float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values())]
    assert max(diffs) < 1e-5
    losses = lambda run: [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses(whole) == pytest.approx(losses(accum), abs=1e-5)


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    from thinkforge.models import load_model
    from thinkforge.train.loop import checkpointing

    runs = {gc: train_sft(small(tmp_path / str(gc), steps=3, save_every=3, gradient_checkpointing=gc)) for gc in (False, True)}
    strip = lambda p: [{k: v for k, v in json.loads(r).items() if k not in ("step_time", "tokens_per_s")}
                       for r in (p / "metrics.jsonl").read_text().splitlines()]
    a, b = strip(runs[False]), strip(runs[True])
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)
    wa, wb = (load_model(str(runs[k] / "model"), device="cpu")[0].state_dict() for k in (False, True))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    model = load_model(str(runs[True] / "model"), device="cpu")[0]
    assert not model.model.gradient_checkpointing
    assert checkpointing(model, small(tmp_path / "x", gradient_checkpointing=True)).model.gradient_checkpointing


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_weights_and_tracks_fp32(tmp_path, dtype):
    from thinkforge.models import load_model

    ref = train_sft(small(tmp_path / "fp32", steps=2, save_every=2, dtype="fp32"))
    run = train_sft(small(tmp_path / dtype, steps=2, save_every=2, dtype=dtype))
    a = [json.loads(r) for r in (ref / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert a[0]["loss"] != b[0]["loss"]  # the forward really ran in low precision …
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=2e-2)  # … and still computes the same loss
    model = load_model(str(run / "model"), device="cpu", dtype=None)[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert (state["scaler"] is not None) == (dtype == "fp16")  # fp16 keeps its loss scale for an exact resume


def test_tensorboard_events_hold_the_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train_sft(small(tmp_path, steps=3, save_every=3, report_to="tensorboard"))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss", "grad_norm", "lr", "token_accuracy"} <= set(events.Tags()["scalars"])
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in got] == [0, 1, 2]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # float32 in the event file
