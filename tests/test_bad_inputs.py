"""The bad-input catalogue (docs/bad_inputs.md lists the same cases): every malformed input gives a
one-line message naming what is wrong and a non-zero exit, and nothing written before is lost."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkforge.cli import main
from thinkforge.models import char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")

    def w(name, text):
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(d / name)

    f = {
        "empty": w("empty.jsonl", ""),
        "latin1": w("latin1.jsonl", b'{"question": "caf\xe9", "answer": "1"}\n'),
        "no_answer": w("no_answer.jsonl", '{"question": "q"}\n'),
        "list_answer": w("list_answer.jsonl", '{"question": "q", "answer": [1, 2]}\n'),
        "dup_ids": w("dup.jsonl", '{"id": 1, "question": "a", "answer": "1"}\n{"id": 1, "question": "b", "answer": "2"}\n'),
        "bad_json": w("bad_json.jsonl", '{"question": "a", "answer": "1"}\n{"question": oops}\n'),
        "huge_row": w("huge.jsonl", "".join(json.dumps({"question": "1+" * 5000 + "1", "answer": "5001"}) + "\n"
                                            for _ in range(3))),
        "bad_toml": w("bad.toml", "lr = [\n"),
        "typo_toml": w("typo.toml", "learning_rate = 0.1\n"),
        "pairs": w("pairs.jsonl", '{"prompt": "p"}\n'),
        "plain": w("plain.jsonl", "".join(json.dumps({"question": f"{i}+{i}?", "answer": str(2 * i)}) + "\n"
                                          for i in range(50))),
        "recipe": w("recipe.toml", 'task = "add"\n[[stage]]\nname = "x"\nrun = "kto"\n'),
        "labels": w("labels.jsonl", json.dumps({"question": "1*1", "completion": "<think>\na\n</think>\n<answer>1</answer>",
                                                "labels": [1.0]}) + "\n"),
    }
    pq.write_table(pa.table({"question": ["1+1?"], "solution": ["2"]}), d / "no_answer.parquet")
    f["parquet"] = str(d / "no_answer.parquet")
    tok = char_tokenizer()
    (d / "noconfig").mkdir()
    f["noconfig"] = str(d / "noconfig")
    tiny_model(tok, "micro").save_pretrained(d / "notok")
    f["notok"] = str(d / "notok")
    small = tiny_model(tok, "micro", vocab_size=50)
    small.save_pretrained(d / "vocab")
    tok.save_pretrained(d / "vocab")
    f["vocab"] = str(d / "vocab")
    from transformers import T5Config

    T5Config(vocab_size=len(tok), d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(d / "t5")
    tok.save_pretrained(d / "t5")
    f["t5"] = str(d / "t5")
    tiny_model(tok, "micro").save_pretrained(d / "causal")  # a complete causal LM folder: a policy, not a reward model
    tok.save_pretrained(d / "causal")
    f["causal"] = str(d / "causal")
    f["dir"] = str(d)
    return f


# (case id, argv with {placeholders} from the files fixture, a phrase the message must contain)
CATALOGUE = [
    # configs and flags
    ("unknown-field", ["train", "sft", "--stepz", "3"], "unknown field 'stepz'"),
    ("wrong-type", ["train", "sft", "--lr", "fast"], "--lr: expected float, got 'fast'"),
    ("float-for-int", ["train", "sft", "--steps", "2.5"], "--steps: expected int"),
    ("negative-size", ["train", "sft", "--batch-size", "-4"], "batch_size must be >= 1"),
    ("zero-steps", ["train", "grpo", "--steps", "0"], "steps must be >= 1"),
    ("group-size-1", ["train", "grpo", "--group-size", "1"], "group_size must be >= 2"),
    ("unknown-loss", ["train", "grpo", "--loss", "ppo"], "loss must be one of"),
    ("zero-temperature-rl", ["train", "grpo", "--temperature", "0"], "temperature must be > 0"),
    ("async-with-lora", ["train", "grpo", "--async-rollouts", "true", "--lora-r", "8"], "async_rollouts needs a full model"),
    ("rollout-lag-2", ["train", "grpo", "--async-rollouts", "true", "--rollout-lag", "2"], "rollout_lag must be 0 or 1"),
    ("micro-rows-and-tokens", ["train", "grpo", "--micro-batch-size", "8", "--micro-batch-tokens", "4096"],
     "not both"),
    ("bad-trace", ["train", "sft", "--trace", "long"], "trace must be 'cot', 'direct' or 'mixed'"),
    ("accum-not-dividing", ["train", "sft", "--batch-size", "10", "--grad-accum", "3"], "multiple of grad_accum"),
    ("bad-bool", ["train", "sft", "--packing", "maybe"], "expected true or false"),
    ("missing-task", ["train", "sft", "--task", "nope", "--out", "{dir}/r1"], "unknown task 'nope'"),
    ("bad-task-option", ["train", "sft", "--task", "add", "--task-options", "width=3", "--out", "{dir}/r2"],
     "bad option for task 'add'"),
    ("bad-toml", ["train", "sft", "--config", "{bad_toml}"], "invalid TOML"),
    ("missing-config", ["train", "sft", "--config", "{dir}/none.toml"], "no such config file"),
    ("unknown-field-in-toml", ["train", "sft", "--config", "{typo_toml}"], "unknown field 'learning_rate'"),
    ("eval-zero-samples", ["eval", "--samples", "0"], "must be >= 1"),
    ("bad-port", ["serve", "--port", "70000"], "port < 65536"),
    # data files
    ("empty-file", ["train", "sft", "--task", "{empty}", "--trace", "direct", "--out", "{dir}/r3"], "no problems in the file"),
    ("wrong-encoding", ["train", "sft", "--task", "{latin1}", "--trace", "direct", "--out", "{dir}/r4"], "not UTF-8"),
    ("missing-field", ["train", "sft", "--task", "{no_answer}", "--out", "{dir}/r5"], ":1: missing field 'answer'"),
    ("non-string-answer", ["train", "sft", "--task", "{list_answer}", "--out", "{dir}/r6"], "must be a string or a number"),
    ("duplicate-ids", ["train", "sft", "--task", "{dup_ids}", "--out", "{dir}/r7"], "duplicate id '1'"),
    ("invalid-json-line", ["train", "sft", "--task", "{bad_json}", "--out", "{dir}/r8"], ":2: invalid JSON"),
    ("huge-row", ["train", "sft", "--task", "{huge_row}", "--trace", "direct", "--train-problems", "1",
                  "--out", "{dir}/r9"], "more than max_len=128"),
    ("parquet-missing-column", ["train", "sft", "--task", "{parquet}", "--out", "{dir}/r10"], "row 0: missing field 'answer'"),
    ("sft-data-missing-field", ["train", "sft", "--data", "{pairs}", "--out", "{dir}/r11"], "field 'completion'"),
    ("sft-data-missing-file", ["train", "sft", "--data", "{dir}/none.jsonl", "--out", "{dir}/r13"], "none.jsonl: no such file"),
    ("cot-without-steps", ["train", "sft", "--task", "{plain}", "--out", "{dir}/r12"], "has no gold steps"),
    # model folders
    ("missing-model-folder", ["eval", "--model", "{dir}/none/model"], "no such model folder"),
    ("folder-without-config", ["eval", "--model", "{noconfig}"], "no config.json"),
    ("missing-tokenizer", ["eval", "--model", "{notok}"], "no tokenizer"),
    ("mismatched-vocab", ["eval", "--model", "{vocab}"], "but the model's embedding has 50"),
    ("non-causal-architecture", ["eval", "--model", "{t5}"], "not a causal language model"),
    ("offline-hub-id", ["generate", "--model", "no-such-org/no-such-model"], "cannot load it from the Hugging Face hub"),
    # bigger models: LoRA, precision, sharding
    ("lora-on-random-model", ["train", "sft", "--lora-r", "8"], "LoRA adapts a trained model"),
    ("lora-unknown-target", ["train", "sft", "--model", "{causal}", "--lora-r", "4", "--lora-targets", "q_proj,qq_proj",
                             "--trace", "direct", "--out", "{dir}/r16"], "['qq_proj'] not among this model's modules"),
    ("fsdp-with-lora", ["train", "grpo", "--fsdp", "true", "--lora-r", "4"], "fsdp shards full fine-tuning"),
    ("bad-dtype", ["train", "dpo", "--dtype", "fp8"], "dtype must be one of auto, fp32, bf16, fp16"),
    ("rm-lora-with-extra-layers", ["train", "rm", "--kind", "preference", "--data", "{pairs}", "--policy", "{causal}",
                                   "--lora-r", "4", "--extra-layers", "1", "--out", "{dir}/r17"], "use one or the other"),
    ("rm-unknown-pooling", ["train", "rm", "--kind", "preference", "--data", "{pairs}", "--pooling", "mean"],
     "pooling must be one of ('last', 'sum', 'logprob')"),
    ("rm-logprob-with-extra-layers", ["train", "rm", "--kind", "preference", "--data", "{pairs}", "--pooling", "logprob",
                                      "--extra-layers", "1"], "--pooling logprob keeps the model as it is: no --extra-layers"),
    # command line and runs
    ("unknown-command", ["frobnicate"], "usage"),
    ("positional-junk", ["train", "sft", "steps", "3"], "unexpected argument 'steps'"),
    ("flag-without-value", ["train", "sft", "--steps"], "--steps needs a value"),
    ("resume-without-checkpoint", ["train", "sft", "--resume", "--out", "{dir}/fresh"], "nothing to resume"),
    ("unwritable-output", ["train", "sft", "--out", "/proc/thinkforge-run"], "cannot write the run folder"),
    ("bad-recipe-stage", ["pipeline", "{recipe}"], "'run' must be one of"),
    # reward models and test-time search
    ("rm-unknown-labels", ["train", "rm", "--labels", "vibes"], "labels must be one of"),
    ("rm-gold-labels-without-checker", ["train", "rm", "--task", "{plain}", "--policy", "{causal}", "--out", "{dir}/r14"],
     "has no step checker"),
    ("rm-labels-count-mismatch", ["train", "rm", "--data", "{labels}", "--policy", "{causal}", "--out", "{dir}/r15"],
     "labels.jsonl:1: 1 labels but the completion has 2 steps"),
    ("eval-method-unknown", ["eval", "--method", "mcts"], "unknown method(s) ['mcts']"),
    ("eval-method-needs-prm", ["eval", "--method", "prm-beam"], "method prm-beam needs a PRM"),
    ("eval-n-zero", ["eval", "--method", "maj", "--n", "0,4"], "n = 0 only makes sense for budget"),
    ("grpo-rm-scope-unknown-reward", ["train", "grpo", "--rm-scopes", "rm:none=answer"],
     "rm_scopes: 'rm:none' is not an rm:<folder> reward of rewards"),
    ("grpo-families-without-mixed-task", ["train", "grpo", "--reward-families", "accuracy=[\"a\"]", "--out", "{dir}/g9"],
     "reward_families needs a mixed task"),
    ("sft-primed-trace-task-cannot", ["train", "sft", "--task", "mul", "--check-share", "0.1", "--out", "{dir}/p1"],
     "task 'mul' cannot write primed traces"),
    ("sft-primed-direct-trace", ["train", "sft", "--task", "add", "--trace", "direct", "--fix-share", "0.1"],
     "fix_share primes the task's CoT traces: it needs trace cot or mixed"),
    ("aha-no-priming", ["aha", "--check-share", "0", "--fix-share", "0"], "not both 0"),
    ("aha-task-cannot-prime", ["aha", "--task", "mul", "--task-options", "", "--out", "{dir}/a1"],
     "the primed arm needs a task that writes checks and wrong steps"),
    ("attack-unknown-goal", ["attack", "--goals", "41"], "goals must be among"),
    ("attack-budgets-not-increasing", ["attack", "--budgets", "16,0"], "budgets must be increasing integers >= 0"),
    ("attack-integer-goal-on-labels", ["attack", "--task", "syllogism", "--task-options", "", "--goals", "42",
                                       "--out", "{dir}/at1"], "goals 42, plus1 and times7 need integer answers"),
    ("overopt-sizes-not-increasing", ["overopt", "--data-sizes", "1500,150"], "data_sizes must be increasing"),
    ("overopt-bon-n-not-power-of-2", ["overopt", "--bon-n", "100"], "bon_n must be a power of 2"),
    ("overopt-other-task-default-options", ["overopt", "--task", "mul", "--out", "{dir}/o2"],
     "task_options defaults to add's {'digits': 5, 'terms': 2}: pass --task-options for 'mul'"),
    ("overopt-task-without-gold-steps", ["overopt", "--task", "{plain}", "--task-options", "", "--out", "{dir}/o1"], "has no gold steps"),
    ("eval-policy-as-prm", ["eval", "--model", "{causal}", "--method", "bon-prm", "--prm", "{causal}"],
     "not a thinkforge reward model"),
]


@pytest.mark.parametrize("case,argv,phrase", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_gives_a_clear_error(files, capsys, case, argv, phrase):
    code = main([a.format(**files) for a in argv])
    captured = capsys.readouterr()
    assert code != 0, case
    message = captured.err + captured.out
    assert phrase in message, (case, message[-500:])
    assert "Traceback" not in message


def test_existing_run_is_not_overwritten(files, capsys):
    out = f"{files['dir']}/kept"
    args = ["train", "sft", "--task", "add", "--task-options", "digits=2", "--size", "micro", "--steps", "2",
            "--batch-size", "4", "--max-len", "64", "--train-problems", "20", "--out", out]
    assert main(args) == 0
    before = Path(out, "metrics.jsonl").read_text()
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert Path(out, "metrics.jsonl").read_text() == before  # nothing written so far is lost


def test_the_docs_table_lists_every_case():
    table = (Path(__file__).parent.parent / "docs" / "bad_inputs.md").read_text()
    missing = [c[0] for c in CATALOGUE if f"`{c[0]}`" not in table]
    assert not missing and len(CATALOGUE) >= 30
