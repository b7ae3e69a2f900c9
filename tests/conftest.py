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


# Files in this order (each stays whole on one xdist worker, --dist loadfile): the heaviest first, as the
# longest-first rule keeps the two workers' finishing times close; the other users of the syllogism model
# (test_serve_metrics.py, test_serve.py) last, so the model that test_serve_robust.py trains first is ready
# when they start instead of keeping a worker waiting.
HEAVY_FIRST = ["test_serve_robust.py", "test_cli.py", "test_ddp.py", "test_grpo.py", "test_preferences.py", "test_ui.py",
               "test_pipeline.py", "test_attack.py"]
LAST = ["test_serve_metrics.py", "test_serve.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return (0, HEAVY_FIRST.index(name)) if name in HEAVY_FIRST else (2, 0) if name in LAST else (1, 0)

    items.sort(key=rank)  # (stable: tests keep their order within a file, other files theirs)
