"""torchrun with 2 CPU processes (gloo) gives the same parameters as 1 process on the same global batch.

One test goes through torchrun itself; the others run their ranks with tests/ranks.py (the same command
line and rendezvous environment, forked from a process that has imported torch once)."""
import subprocess
import sys

import pytest
import ranks
from safetensors.torch import load_file
from serve_helpers import free_port

ARGS = ["train", "sft", "--task", "add", "--task-options", "digits=2", "--size", "micro", "--steps", "4",
        "--batch-size", "16", "--max-len", "64", "--train-problems", "200", "--warmup", "1", "--threads", "1",
        "--packing", "false"]


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory):
    """The 1-process SFT run both the DDP and the FSDP runs are held to."""
    one = tmp_path_factory.mktemp("sft") / "one"
    r = ranks.run([*ARGS, "--out", str(one)], world=1)
    assert r.returncode == 0, r.stderr[-2000:]
    return one


@pytest.mark.timeout(240)
def test_two_processes_match_one(tmp_path, one_process_sft):
    one, two = one_process_sft, tmp_path / "two"
    r = _torchrun([*ARGS, "--out", str(two)])
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max parameter difference, 2 processes vs 1: {worst:.1e}")
    assert worst < 1e-5, worst
    assert (one / "metrics.jsonl").read_text().count("\n") == (two / "metrics.jsonl").read_text().count("\n") == 4


def letters(completions, problems, **_):
    """A reward with variance even for a random model: the share of lowercase letters."""
    return [sum(ch.islower() for ch in c) / max(1, len(c)) for c in completions]


def _torchrun(args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port()), "-m", "thinkforge", *args],
                          capture_output=True, text=True, timeout=200)


@pytest.mark.timeout(240)
def test_grpo_two_processes_match_one(tmp_path):
    """Roll-outs split over 2 processes (3 prompts: 2 on rank 0, 1 on rank 1), rewards gathered, each rank
    trains on its rows in micro-batches of 5: same roll-outs, rewards and parameters as 1 process in one pass
    (KL term and mu = 2 included)."""
    import json

    from thinkforge.models import char_tokenizer, save_model, tiny_model

    tok = char_tokenizer()
    start = save_model(tiny_model(tok, "micro"), tok, tmp_path / "start")
    args = ["train", "grpo", "--model", str(start), "--task", "add", "--task-options", "digits=2", "--steps", "3",
            "--prompts-per-step", "3", "--group-size", "4", "--max-new-tokens", "16", "--rewards",
            "test_ddp:letters=1.0", "--dynamic-sampling", "false", "--beta", "0.04", "--mu", "2", "--lr", "1e-3",
            "--warmup", "1", "--train-problems", "50", "--threads", "1"]
    one, two = tmp_path / "one", tmp_path / "two"  # (the ranks import this file for the reward, as sys.path has it)
    r = ranks.run([*args, "--out", str(one)], world=1)
    assert r.returncode == 0, r.stderr[-2000:]
    r = ranks.run([*args, "--out", str(two), "--micro-batch-size", "5"])  # and 6 rows per rank in 5 + 1
    assert r.returncode == 0, r.stderr[-4000:]
    sharded = tmp_path / "fsdp"  # FSDP2: generation on gathered weights, a sharded reference, the same update
    r = ranks.run([*args, "--out", str(sharded), "--micro-batch-size", "5", "--fsdp", "true"])
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two, sharded)]
    assert len(rows[0]) == len(rows[1]) == len(rows[2]) == 3
    for a, b in [*zip(rows[0], rows[1]), *zip(rows[0], rows[2])]:  # same roll-outs: rewards and lengths equal; losses and KL within float noise
        for key in ("reward", "reward_std", "completions/mean_length", "accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        for key in ("loss", "kl", "grad_norm", "entropy", "clip_ratio/region_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert rows[0][1]["kl"] > 0  # the policy moved away from the reference: the KL term was live
    a = load_file(one / "model" / "model.safetensors")
    for run in (two, sharded):
        b = load_file(run / "model" / "model.safetensors")
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"GRPO: max parameter difference, 2 processes ({run.name}) vs 1: {worst:.1e}")
        assert a.keys() == b.keys() and worst < 1e-5, worst


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trainer", ["dpo", "rm"])
def test_preference_trainers_two_processes_match_one(tmp_path, trainer):
    """DPO and the Bradley-Terry RM under torchrun: each process takes every other pair / ranking of the
    global batch; the parameters equal a 1-process run's."""
    import json

    from thinkforge.models import char_tokenizer, save_model, tiny_model

    tok = char_tokenizer()
    start = save_model(tiny_model(tok, "micro"), tok, tmp_path / "start")
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}", "completions": [f"<answer>{i}7</answer>", f"<answer>{i}3</answer>",
                                                                              f"<answer>{i}</answer>"], "ranking": [0, 1, 1]}) + "\n"
                            for i in range(40)))
    common = ["--data", str(data), "--steps", "3", "--batch-size", "8", "--threads", "1", "--warmup", "1"]
    args = (["train", "dpo", "--model", str(start), "--eval-problems", "0", "--lr", "3e-4", *common] if trainer == "dpo" else
            ["train", "rm", "--kind", "preference", "--policy", str(start), "--eval-share", "0.2", "--lr", "3e-4", *common])
    one, two = tmp_path / "one", tmp_path / "two"
    r = ranks.run([*args, "--out", str(one)], world=1)
    assert r.returncode == 0, r.stderr[-2000:]
    r = ranks.run([*args, "--out", str(two)])
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"{trainer}: max parameter difference, 2 processes vs 1: {worst:.1e}")
    assert worst < 1e-5 and worst == worst, worst
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.timeout(300)
def test_fsdp_two_processes_match_one_and_resume(tmp_path, one_process_sft):
    """FSDP2 (fully_shard per layer, gloo): 2 processes that stop after step 2 and resume to step 4 end with the
    parameters and losses of 1 uninterrupted process. The checkpoint is written in shards, nothing gathered:
    its weights a plain HF folder, its optimizer state one file per process; 1 process resumes it as well
    (the state re-sharded on reading), and 2 FSDP processes resume a 1-process checkpoint. The saved model is a plain HF checkpoint (one copy of the tied
    embedding)."""
    import json
    import shutil

    from thinkforge.models import load_model

    one, two, single = one_process_sft, tmp_path / "two", tmp_path / "single"
    half = [x if x != "4" else "2" for x in ARGS]
    r = ranks.run([*half, "--out", str(two), "--fsdp", "true"])
    assert r.returncode == 0, r.stderr[-4000:]
    ck = two / "checkpoint"
    assert sorted(p.name for p in (ck / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list(ck.glob("sharded")) and (ck / "model.safetensors").is_file()
    halfway = load_file(ck / "model.safetensors")  # the weights after step 2, as a plain HF folder
    assert halfway.keys() == load_file(two / "model" / "model.safetensors").keys()
    assert load_model(str(ck), device="cpu")[0].num_parameters() > 0
    shutil.copytree(two, single)
    r = ranks.run([*ARGS, "--out", str(two), "--fsdp", "true", "--resume", "true"])
    assert r.returncode == 0, r.stderr[-4000:]
    r = ranks.run([*ARGS, "--out", str(single), "--resume", "true"], world=1)
    assert r.returncode == 0, r.stderr[-2000:]
    grown = tmp_path / "grown"  # and the other way: a 1-process checkpoint resumed by 2 FSDP processes
    r = ranks.run([*half, "--out", str(grown)], world=1)
    assert r.returncode == 0, r.stderr[-2000:]
    r = ranks.run([*ARGS, "--out", str(grown), "--fsdp", "true", "--resume", "true"])
    assert r.returncode == 0, r.stderr[-4000:]
    a = load_file(one / "model" / "model.safetensors")
    losses = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    for run in (two, single, grown):
        b = load_file(run / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        print(f"max parameter difference, FSDP 2 processes stopped and resumed ({run.name}) vs 1: {worst:.1e}")
        assert worst < 1e-5, worst
        assert losses(run) == pytest.approx(losses(one), rel=1e-5)
    assert max(float((a[k] - halfway[k]).abs().max()) for k in a) > 1e-4  # steps 3 and 4 moved the weights


@pytest.mark.timeout(240)
def test_fsdp_checkpoint_that_cannot_be_written_is_every_processs_error(tmp_path):
    """A checkpoint write that fails (files capped at 64 KB here, so each process's shard of the weights
    cannot be written) stops both FSDP processes with the same clear error instead of leaving one waiting on
    the other, and leaves no half-written folder."""
    out = tmp_path / "run"
    half = [x if x != "4" else "2" for x in ARGS]
    r = ranks.run([*half, "--out", str(out), "--fsdp", "true"], file_limit=64 * 1024)
    assert r.returncode != 0
    said = r.stderr[-4000:]
    assert said.count("error: step 2: could not write the checkpoint (process 0: File too large; process 1: "
                      "File too large); no earlier checkpoint exists") == 2, said
    assert not (out / "checkpoint").exists() and not list(out.glob(".checkpoint.*"))
