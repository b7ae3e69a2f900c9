import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thinkforge.rewards import accuracy
from thinkforge.tasks import get_task
from thinkforge.tasks.files import DataFileError, read_problems


def test_reasoning_gym_adapter_scores_with_its_own_scorer():
    t = get_task("reasoning-gym:chain_sum", min_terms=2, max_terms=3)
    probs = t.problems(5, seed=1)
    assert all(t.score(p, p.answer) == 1.0 for p in probs)
    assert t.score(probs[0], str(int(probs[0].answer) + 1)) == 0.0
    # our extraction comes first: reasoning-gym alone gives ~0.1 partial credit to a tagged answer
    ok = accuracy([f"<think>\nx\n</think>\n<answer>{p.answer}</answer>" for p in probs], probs, task=t)
    assert ok == [1.0] * 5


def test_reasoning_gym_without_gold_answer():
    t = get_task("reasoning-gym:propositional_logic")
    p = t.problems(1)[0]
    assert p.answer == ""
    assert t.score(p, p.meta["entry"]["metadata"]["example_answer"]) == 1.0


def test_reasoning_gym_unknown_name():
    with pytest.raises(KeyError, match="unknown reasoning-gym dataset"):
        get_task("reasoning-gym:nope")


def write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text) if isinstance(text, str) else f.write_bytes(text)
    return f


def test_jsonl_with_gsm8k_answers(tmp_path):
    rows = [
        {"question": "Nat has 48 clips and sells half. How many left?", "answer": "Half is 48/2 = <<48/2=24>>24.\n#### 24"},
        {"question": "2+2?", "answer": 4, "steps": ["2+2=4"], "id": "b"},
    ]
    f = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b = read_problems(f)
    assert (a.answer, a.steps) == ("24", ["Half is 48/2 = 24."])
    assert (b.answer, b.steps, b.id) == ("4", ["2+2=4"], "b")
    t = get_task(str(f))
    assert t.score(a, "24.0") == 1.0


def test_parquet(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["1+1?", "2*3?"], "answer": ["2", "6"]}), f)
    assert [p.answer for p in read_problems(f)] == ["2", "6"]
    pq.write_table(pa.table({"question": ["1+1?"], "solution": ["2"]}), f)
    with pytest.raises(DataFileError, match=r"d.parquet: row 0: missing field 'answer'"):
        read_problems(f)


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"question": "q", "answer": "1"}\n{"question": "q2", "answer": 2\n', r"d.jsonl:2: invalid JSON"),
        ('{"question": "q"}\n', r"d.jsonl:1: missing field 'answer'"),
        ('{"question": "q", "answer": [1, 2]}\n', r"d.jsonl:1: field 'answer' must be a string or a number, got list"),
        ('{"question": "", "answer": "1"}\n', r"d.jsonl:1: field 'question' must be a non-empty string"),
        ('{"question": "q", "answer": "1", "steps": 3}\n', r"d.jsonl:1: field 'steps' must be a list"),
        ("\n\n", r"d.jsonl: no problems in the file"),
        ('[1, 2]\n', r"d.jsonl:1: expected an object"),
        ('{"question": "a", "answer": "1", "id": 1}\n{"question": "b", "answer": "2", "id": 1}\n', "duplicate id '1'"),
        (b'{"question": "caf\xe9", "answer": "1"}\n', r"d.jsonl: not UTF-8 text"),
    ],
)
def test_bad_rows_are_named(tmp_path, text, message):
    with pytest.raises(DataFileError, match=message):
        read_problems(write(tmp_path, "d.jsonl", text))


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_problems(tmp_path / "none.jsonl")
    with pytest.raises(DataFileError, match="expected a .jsonl or .parquet"):
        read_problems(write(tmp_path, "d.csv", "question,answer\n"))
