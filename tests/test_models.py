import pytest
import torch

from thinkforge.format import SPECIAL_TOKENS
from thinkforge.models import ModelLoadError, char_tokenizer, keeps_torch_threads, load_model, save_model, tiny_model


def test_char_tokenizer_round_trip(char_tok):
    text = "<|im_start|>user\n347*89 é<|im_end|>\n<think>\n347*9=3213\n</think>"
    ids = char_tok.encode(text, add_special_tokens=False)
    assert char_tok.decode(ids) == text.replace("é", "<|unk|>")
    for t in SPECIAL_TOKENS:
        assert len(char_tok.encode(t, add_special_tokens=False)) == 1
    assert char_tokenizer(["é"]).decode(char_tokenizer(["é"]).encode("é", add_special_tokens=False)) == "é"


def test_save_load_identical_logits(tmp_path, char_tok):
    model = tiny_model(char_tok, "micro", seed=1)
    x = torch.tensor([char_tok.encode("<|im_start|>user\n12+34<|im_end|>")])
    with torch.no_grad():
        before = model(x).logits
    save_model(model, char_tok, tmp_path / "m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    loaded, tok = load_model(str(tmp_path / "m"), device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, before)
    assert tok.chat_template == char_tok.chat_template and tok.encode("12+34") == char_tok.encode("12+34")
    save_model(loaded, tok, tmp_path / "m")  # overwriting in place keeps a loadable folder
    assert load_model(str(tmp_path / "m"), device="cpu")[0].config.hidden_size == 64


def test_load_errors(tmp_path, char_tok):
    with pytest.raises(ModelLoadError, match="no local folder 'org/missing-model'.*pass the local folder"):
        load_model("org/missing-model")
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(str(tmp_path / "nothing" / "here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    tiny_model(char_tok, "micro").save_pretrained(tmp_path / "notok")
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(str(tmp_path / "notok"))


def test_architecture_without_weights_has_meta_parameters_and_real_buffers(tmp_path, char_tok):
    """What an FSDP2 process other than rank 0 builds before receiving its shards: no parameter memory, but
    the rotary tables (buffers) equal those of the loaded model, and no parameter registration left patched."""
    path = save_model(tiny_model(char_tok, "micro"), char_tok, tmp_path / "m")
    full, _ = load_model(str(path), device="cpu")
    empty, tok = load_model(str(path), device="cpu", weights=False)
    assert len(tok) == len(char_tok)
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in full.named_parameters()]
    assert all(p.device.type == "meta" for p in empty.parameters())
    buffers = dict(full.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_commands_give_back_the_callers_thread_count():
    """run_demo, run_recipe and the other commands set torch's threads for their work; the caller's count
    comes back when they return or fail."""
    from thinkforge import aha, attack, overopt, pipeline

    @keeps_torch_threads
    def busy(n, fail):
        torch.set_num_threads(n)
        if fail:
            raise RuntimeError("x")
        return torch.get_num_threads()

    before = torch.get_num_threads()
    assert busy(before + 1, False) == before + 1 and torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        busy(before + 2, True)
    assert torch.get_num_threads() == before
    for fn in (pipeline.run_demo, pipeline.run_recipe, aha.run_aha, attack.run_attack, overopt.run_overopt):
        assert fn.__code__ is busy.__code__, fn  # wrapped by keeps_torch_threads
