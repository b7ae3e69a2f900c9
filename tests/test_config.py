import pytest

from thinkforge.config import ConfigError, parse_config
from thinkforge.train.sft import SFTConfig


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\nsteps = 50\ntask_options = {digits_a = 4}\npacking = false\n')
    cfg = parse_config(SFTConfig, ["--config", str(f), "--steps", "70", "--task-options", "digits_b=3,x=y"])
    assert (cfg.lr, cfg.steps, cfg.packing) == (0.01, 70, False)
    assert cfg.task_options == {"digits_b": 3, "x": "y"}
    assert parse_config(SFTConfig, ["--resume"]).resume is True
    assert parse_config(SFTConfig, ["--packing=false"]).packing is False


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "fast"], "--lr: expected float, got 'fast'"),
        (["--steps", "1.5"], "--steps: expected int"),
        (["--stepz", "3"], "unknown field 'stepz'"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--trace", "long"], "trace must be 'cot', 'direct' or 'mixed'"),
        (["--batch-size", "10", "--grad-accum", "3"], "must be a multiple of grad_accum"),
        (["--packing", "maybe"], "expected true or false"),
        (["steps", "3"], "unexpected argument 'steps'"),
        (["--steps"], "--steps needs a value"),
        (["--task-options", "digits"], "expected key=value pairs"),
    ],
)
def test_bad_flags(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(SFTConfig, argv)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        parse_config(SFTConfig, ["--config", str(tmp_path / "none.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = [\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        parse_config(SFTConfig, ["--config", str(bad)])
    typo = tmp_path / "typo.toml"
    typo.write_text('learning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="typo.toml: unknown field 'learning_rate'"):
        parse_config(SFTConfig, ["--config", str(typo)])
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('steps = "many"\n')
    with pytest.raises(ConfigError, match="field 'steps' in the config file: expected int"):
        parse_config(SFTConfig, ["--config", str(wrong)])


def test_claim_folder_keeps_a_run_made_before_a_field_existed_only_while_that_field_is_at_its_default(tmp_path):
    from thinkforge.config import claim_folder
    from thinkforge.overopt import OveroptConfig

    out = tmp_path / "run"
    claim_folder(OveroptConfig(out=str(out)), out, "a run")
    (out / "part").write_text("kept")
    saved = out / "config.toml"
    saved.write_text("\n".join(x for x in saved.read_text().splitlines() if not x.startswith("rm_pooling")))
    claim_folder(OveroptConfig(out=str(out)), out, "a run")  # the old run used the default: the same config
    assert (out / "part").read_text() == "kept"
    saved.write_text("\n".join(x for x in saved.read_text().splitlines() if not x.startswith("rm_pooling")))
    with pytest.raises(ConfigError, match="another config"):
        claim_folder(OveroptConfig(out=str(out), rm_pooling="logprob"), out, "a run")
    with pytest.raises(ConfigError, match="another config"):
        claim_folder(OveroptConfig(out=str(out), rm_lr=0.5), out, "a run")
