"""torchrun with 2 CPU processes (gloo) gives the same parameters as 1 process on the same global batch."""
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ARGS = ["train", "sft", "--task", "add", "--task-options", "digits=2", "--size", "micro", "--steps", "4",
        "--batch-size", "16", "--max-len", "64", "--train-problems", "200", "--warmup", "1", "--threads", "1",
        "--packing", "false"]


@pytest.mark.timeout(240)
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "thinkforge", *ARGS, "--out", str(one)], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), "-m", "thinkforge", *ARGS, "--out", str(two)],
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max parameter difference, 2 processes vs 1: {worst:.1e}")
    assert worst < 1e-5, worst
    assert (one / "metrics.jsonl").read_text().count("\n") == (two / "metrics.jsonl").read_text().count("\n") == 4


def test_grpo_under_torchrun_is_refused_clearly(monkeypatch):
    from thinkforge.config import ConfigError
    from thinkforge.train.grpo import GRPOConfig, train_grpo

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="GRPO under torchrun is not implemented yet"):
        train_grpo(GRPOConfig())
