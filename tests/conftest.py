import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)  # two workers share the 2 cores


@pytest.fixture(scope="session")
def char_tok():
    from thinkforge.models import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="session")
def syllogism_model(tmp_path_factory):
    """A micro model SFT-trained on the syllogism task (about a minute at one thread): what the serving tests
    talk to. Trained once per run: under xdist the workers share it, the first to need it training it while
    the others wait on a lock."""
    import fcntl

    from thinkforge.models import load_model
    from thinkforge.train.sft import SFTConfig, train_sft

    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("syl")
    out, done = root / "syllogism", root / "syllogism.done"
    with open(root / "syllogism.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            train_sft(SFTConfig(task="syllogism", size="micro", steps=120, batch_size=32, max_len=256, out=str(out),
                                train_problems=1000, save_every=120, lr=3e-3, min_lr_ratio=1.0, overwrite=True))
            done.touch()
    model, tok = load_model(str(out / "model"), device="cpu")
    return model, tok, str(out / "model")
