import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def char_tok():
    from thinkforge.models import char_tokenizer

    return char_tokenizer()
