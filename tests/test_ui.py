"""The labelling app and its SQLite store: rankings in, the trainers' files out; one label per labeller per
item; concurrent labellers; kill -9 loses no acknowledged label; model output escaped; the token."""
import html
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_helpers import free_port

from thinkforge.preferences import read_preferences
from thinkforge.ui import ExportConfig, UIConfig, create_app, export
from thinkforge.ui.store import LabelError, LabelStore

ITEMS = [{"prompt": f"{a}*3", "completions": [f"<think>\n{a}*3={3 * a}\n</think>\n<answer>{3 * a}</answer>",
                                                f"<answer>{3 * a + 1}</answer>", f"<answer>{3 * a - 1}</answer>",
                                                "<answer>?</answer>"]} for a in range(11, 17)]


@pytest.fixture
def client(tmp_path):
    app = create_app(UIConfig(db=str(tmp_path / "labels.sqlite")))
    app.state.store.add_items("q", ITEMS)
    return TestClient(app)


def test_rankings_round_trip_into_the_trainers_files(client, tmp_path):
    store = client.app.state.store
    done = []
    for _ in ITEMS[:3]:
        item = client.get("/api/next/q", params={"labeller": "ana"}).json()
        r = client.post("/api/label", json={"item_id": item["item_id"], "labeller": "ana", "ranking": [0, 1, 2, 3]})
        assert r.status_code == 200, r.text
        done.append(item["item_id"])
    for item_id in done:  # bo ranks the same three items
        r = client.post("/api/label", json={"item_id": item_id, "labeller": "bo", "ranking": [0, 2, 1, 3]})
        assert r.status_code == 200, r.text
    item = client.get("/api/next/q", params={"labeller": "ana"}).json()
    assert client.post("/api/label", json={"item_id": item["item_id"], "labeller": "ana", "skip": True}).status_code == 200
    # the next item for bo is one nobody has touched: labellers spread over the queue
    assert client.get("/api/next/q", params={"labeller": "bo"}).json()["item_id"] not in done + [item["item_id"]]
    assert store.counts("q") == {"items": 6, "rankings": 6, "skips": 1, "items_unranked": 3}
    # ana and bo agree on the pairs (0,1), (0,2), (0,3), (1,3), (2,3) and disagree on (1,2): 5 of 6 per item
    agree = store.agreement("q")
    assert agree["pairs_compared"] == 18 and agree["agreement"] == pytest.approx(15 / 18)
    out = tmp_path / "rankings.jsonl"
    msg = export(ExportConfig(db=str(tmp_path / "labels.sqlite"), queue="q", format="rankings", out=str(out)))
    assert "6 rankings rows" in msg and "1 skips" in msg and "3 items nobody ranked" in msg
    rankings = read_preferences(out)
    assert len(rankings) == 6 and rankings[0].ranks == [0, 1, 2, 3] and rankings[0].completions == ITEMS[0]["completions"]
    pairs = tmp_path / "pairs.jsonl"
    export(ExportConfig(db=str(tmp_path / "labels.sqlite"), queue="q", format="pairs", out=str(pairs)))
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(rows) == 6 * 6 and len(read_preferences(pairs)) == 36
    assert rows[0] == {"prompt": ITEMS[0]["prompt"], "chosen": ITEMS[0]["completions"][0],
                       "rejected": ITEMS[0]["completions"][1], "labeller": "ana"}
    ties = client.app.state.store
    ties.add_items("t", ITEMS[:1])
    item = ties.next_item("t", "cy")
    ties.submit(item.id, "cy", [0, 0, 1, 1])  # two ties: 4 ordered pairs
    assert len(ties.export("t", "pairs")) == 4


def test_trains_a_reward_model_from_the_export(client, tmp_path):
    from thinkforge.models import char_tokenizer, save_model, tiny_model
    from thinkforge.train.reward_model import RMConfig, train_reward_model

    store = client.app.state.store
    for who in ("ana", "bo"):
        while (item := store.next_item("q", who)) is not None:
            store.submit(item.id, who, [0, 1, 2, 3] if who == "ana" else [0, 2, 1, 3])
    out = tmp_path / "prefs.jsonl"
    export(ExportConfig(db=str(tmp_path / "labels.sqlite"), queue="q", out=str(out)))
    tok = char_tokenizer()
    policy = save_model(tiny_model(tok, "micro"), tok, tmp_path / "policy")
    run = train_reward_model(RMConfig(kind="preference", data=str(out), policy=str(policy), steps=2, batch_size=4,
                                      out=str(tmp_path / "rm"), save_every=2, warmup=1, eval_share=0.3))
    report = json.loads((run / "eval.json").read_text())
    assert report["train_rankings"] + report["held_out_rankings"] == 12  # 6 items x 2 labellers, none dropped
    assert report["held_out_pairs"] == 6 * report["held_out_rankings"]


def test_one_label_per_labeller_per_item_and_undo(client):
    item = client.get("/api/next/q", params={"labeller": "ana"}).json()
    ok = client.post("/api/label", json={"item_id": item["item_id"], "labeller": "ana", "ranking": [1, 0, 2, 3]})
    assert ok.status_code == 200
    again = client.post("/api/label", json={"item_id": item["item_id"], "labeller": "ana", "ranking": [0, 1, 2, 3]})
    assert again.status_code == 409 and "undo" in again.json()["error"]["message"]
    assert client.get("/api/next/q", params={"labeller": "ana"}).json()["item_id"] != item["item_id"]
    assert client.post("/api/undo", json={"queue": "q", "labeller": "ana"}).json() == {"item_id": item["item_id"]}
    assert client.get("/api/next/q", params={"labeller": "ana"}).json()["item_id"] == item["item_id"]
    assert client.post("/api/label", json={"item_id": item["item_id"], "labeller": "ana", "ranking": [0, 1, 2, 3]}).status_code == 200
    assert client.post("/api/undo", json={"queue": "q", "labeller": "nobody"}).json() == {"item_id": None}


@pytest.mark.parametrize("body,status,phrase", [
    ({"item_id": 1, "labeller": "ana", "ranking": [0, 1]}, 400, "'ranking' must be a list of 4 ranks"),
    ({"item_id": 1, "labeller": "ana", "ranking": [0, 1, 2, 9]}, 400, "integers from 0 (best) to 3"),
    ({"item_id": 1, "labeller": "ana", "ranking": [2, 2, 2, 2]}, 400, "ties every completion"),
    ({"item_id": 1, "labeller": "ana", "ranking": ["0", 1, 2, 3]}, 400, "'ranking' must be a list"),
    ({"item_id": 999, "labeller": "ana", "ranking": [0, 1, 2, 3]}, 404, "no item 999"),
    ({"item_id": "1", "labeller": "ana", "ranking": [0, 1, 2, 3]}, 400, "'item_id' must be an integer"),
    ({"item_id": 1, "labeller": "", "ranking": [0, 1, 2, 3]}, 400, "'labeller' must be a name"),
    ({"item_id": 1, "labeller": "ana"}, 400, "send one of 'ranking', 'steps' or"),
    ({"item_id": 1, "labeller": "ana", "ranking": [0, 1, 2, 3], "skip": True}, 400, "send one of 'ranking', 'steps' or"),
    ({"item_id": 1, "labeller": "ana", "steps": [1, 1]}, 400, "item 1 is a ranking item: send 'ranking'"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_labels_are_4xx_with_a_message(client, body, status, phrase):
    r = client.post("/api/label", json=body)
    assert r.status_code == status and phrase in r.json()["error"]["message"], r.text
    assert "Traceback" not in r.text


def test_bad_queue_rows_add_nothing(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite")
    with pytest.raises(LabelError, match=r"rows\[1\]: field 'completions' must be a list of 2 to 16"):
        store.add_items("q", [ITEMS[0], {"prompt": "p", "completions": ["only one"]}])
    assert store.queues() == []
    assert store.add_items("q", [ITEMS[0], {"prompt": "p", "chosen": "a", "rejected": "b"}]) == {"added": 2, "already_queued": 0}
    assert store.add_items("q", [ITEMS[0]]) == {"added": 0, "already_queued": 1}


def test_model_output_is_shown_escaped(tmp_path):
    app = create_app(UIConfig(db=str(tmp_path / "l.sqlite")))
    evil = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    app.state.store.add_items("evil", [{"prompt": f"p {evil}", "completions": [f"<think>{evil}</think>{evil}", "fine"]}])
    page = TestClient(app).get("/label/evil", params={"labeller": "ana"}).text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") == 3  # prompt, thinking, answer
    index = TestClient(app).get("/").text
    assert "evil" in index


def test_token_guards_every_route(tmp_path):
    app = create_app(UIConfig(db=str(tmp_path / "l.sqlite"), token="s3cret"))
    c = TestClient(app)
    assert c.get("/").status_code == 401 and c.get("/api/queues").status_code == 401
    assert c.post("/api/label", json={}).status_code == 401
    assert c.get("/api/queues", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = c.get("/", params={"token": "s3cret"})  # the browser's way: once in the URL, then a cookie
    assert first.status_code == 200 and "tf_token" in first.cookies
    assert c.get("/api/queues").status_code == 200


def _start(db, tmp_path, queue_file=None):
    port = free_port()
    args = [sys.executable, "-m", "thinkforge", "ui", "--db", str(db), "--port", str(port)]
    if queue_file:
        args += ["--queue-file", str(queue_file), "--queue", "q"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + "/api/queues", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode()[-2000:])


@pytest.mark.timeout(120)
def test_twenty_labellers_at_once_and_kill_9_lose_nothing(tmp_path):
    queue = tmp_path / "items.jsonl"
    many = [{"prompt": f"{a}+{b}", "completions": [str(a + b), str(a + b + 1), str(a - b)]} for a in range(10) for b in range(2)]
    queue.write_text("".join(json.dumps(r) + "\n" for r in many))
    db = tmp_path / "labels.sqlite"
    proc, url = _start(db, tmp_path, queue)
    acknowledged: list[tuple[str, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def labeller(name):
        with httpx.Client(base_url=url, timeout=30) as h:
            while not stop.is_set():
                item = h.get("/api/next/q", params={"labeller": name}).json()
                if item is None:
                    return
                r = h.post("/api/label", json={"item_id": item["item_id"], "labeller": name, "ranking": [0, 1, 2]})
                if r.status_code == 200:
                    with lock:
                        acknowledged.append((name, item["item_id"]))
                else:
                    raise AssertionError(r.text)

    def run(names, seconds=None):
        threads = [threading.Thread(target=_swallow, args=(labeller, n)) for n in names]
        for t in threads:
            t.start()
        if seconds is not None:
            time.sleep(seconds)
            proc.send_signal(signal.SIGKILL)  # kill -9 while 20 people are writing
            stop.set()
        for t in threads:
            t.join(60)

    run([f"p{i}" for i in range(20)], seconds=1.0)
    proc.wait(10)
    with sqlite3.connect(db) as con:
        stored = set(con.execute("SELECT labeller, item_id FROM labels").fetchall())
    assert acknowledged and set(acknowledged) <= stored  # every acknowledged label survived the kill
    assert len(stored) == len(set(stored))
    # restart and finish: every labeller labels every item exactly once
    proc, url = _start(db, tmp_path)
    stop.clear()
    try:
        run([f"p{i}" for i in range(20)])
    finally:
        proc.terminate()
        proc.wait(10)
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT labeller, item_id FROM labels").fetchall()
    assert len(rows) == len(set(rows)) == 20 * len(many)


def _swallow(fn, *args):
    try:
        fn(*args)
    except httpx.HTTPError:  # the server was killed under this labeller: expected in the first round
        pass


@pytest.fixture
def runs_client(tmp_path):
    root = tmp_path / "runs"
    (root / "demo" / "grpo").mkdir(parents=True)
    rows = [{"step": i, "loss": 1.0 / (i + 1), "reward": 0.1 * i, "seen_tokens": 100, "step_time": 0.5} for i in range(5)]
    (root / "demo" / "grpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    (root / "demo" / "grpo" / "config.toml").write_text('model = "<script>x</script>"\n')
    (root / "demo" / "results.json").write_text(json.dumps({"rows": [
        {"stage": "grpo", "method": "greedy", "metric": "pass@1", "value": 0.42, "ci_low": 0.37, "ci_high": 0.47, "n": 300}]}))
    (root / "demo" / "accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (root / "rm").mkdir()
    (root / "rm" / "eval.json").write_text(json.dumps({"accuracy": {"mean": 0.6, "ci_low": 0.5, "ci_high": 0.7}}))
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "eval.json").write_text("{}")  # a run, but not under the runs root
    return TestClient(create_app(UIConfig(runs=str(root), db=str(tmp_path / "l.sqlite")))), root


def test_runs_are_listed_and_shown(runs_client):
    c, root = runs_client
    page = c.get("/runs").text
    assert all(f"/run/{n}" in page for n in ("demo", "demo/grpo", "rm"))
    m = c.get("/api/metrics/demo/grpo").json()
    assert [r["step"] for r in m["rows"]] == [0, 1, 2, 3, 4]  # the half-written 6th line waits for its end
    run = c.get("/run/demo/grpo").text
    assert "&lt;script&gt;x&lt;/script&gt;" in run and "<script>x</script>" not in run  # config shown as text
    demo = c.get("/run/demo").text
    assert "pass@1" in demo and "0.42" in demo and "/file/demo/accuracy.png" in demo
    assert "accuracy" in c.get("/run/rm").text and "0.6" in c.get("/run/rm").text
    assert c.get("/file/demo/accuracy.png").status_code == 200
    for bad in ("/file/%2e%2e/secret.png", "/run/%2e%2e/outside", "/run/nope", "/api/metrics/%2e%2e/%2e%2e", "/file/demo/grpo/config.toml"):
        r = c.get(bad)
        assert r.status_code == 404, bad
    assert c.get("/compare", params={"run": ["demo/grpo", "rm"]}).status_code == 200
    assert c.get("/compare").status_code == 400


def _trace(pid, sample, completion, answer, correct, **kw):
    return {"problem_id": pid, "question": f"q{pid} <b>bold</b>", "gold": "7", "sample": sample, "completion": completion,
            "thinking": "t", "answer": answer, "correct": correct, "majority": "7", "finish_reason": "stop", "tokens": 5,
            "thinking_tokens": 2, "forced_tokens": 0, **kw}


def test_traces_filters_search_and_side_by_side(runs_client):
    c, root = runs_client
    evil = "<script>alert(1)</script>"
    rows = [_trace("a", 0, "<think>t</think><answer>7</answer>", "7", True),
            _trace("a", 1, f"<think>{evil}</think><answer>8</answer>", "8", False, finish_reason="length"),
            _trace("b", 0, "<answer>7</answer>", "7", True),
            _trace("c", 0, "<think>x</think><answer>5</answer>", "5", False, rewards={"format": 0.1, "accuracy": 0.0},
                   reward=0.01, batch=3)]
    (root / "demo" / "grpo" / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rm" / "results.traces.jsonl").write_text(json.dumps(_trace("a", 0, "other run's answer", "7", True)) + "\n")
    ids = lambda html: [x.split("problem=")[1].split("'")[0] for x in html.split("class='problem' href='")[1:]]  # noqa: E731
    assert ids(c.get("/traces/demo/grpo").text) == ["a", "b", "c"]
    assert ids(c.get("/traces/demo/grpo", params={"filter": "wrong"}).text) == ["a", "c"]
    assert ids(c.get("/traces/demo/grpo", params={"filter": "truncated"}).text) == ["a"]
    assert ids(c.get("/traces/demo/grpo", params={"filter": "format_only"}).text) == ["c"]
    assert ids(c.get("/traces/demo/grpo", params={"filter": "disagree"}).text) == ["a", "c"]
    assert ids(c.get("/traces/demo/grpo", params={"q": "SCRIPT"}).text) == ["a"]
    assert c.get("/traces/demo/grpo", params={"filter": "nonsense"}).status_code == 404
    page = c.get("/trace/demo/grpo", params={"problem": "a", "vs": "rm"}).text
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<b>bold</b>" not in page
    assert "other run&#x27;s answer" in page and page.count("class='card") == 3  # 2 here, 1 in the other run
    assert "reward 0.01 (format 0.1, accuracy 0)" in c.get("/trace/demo/grpo", params={"problem": "c"}).text
    assert "/traces/demo/grpo" in c.get("/run/demo/grpo").text


def test_eval_writes_every_sample_as_a_trace(tmp_path, char_tok):
    from thinkforge.evaluate import EvalConfig, run_eval
    from thinkforge.models import save_model, tiny_model

    model = save_model(tiny_model(char_tok, "micro"), char_tok, tmp_path / "m")
    run_eval(EvalConfig(model=str(model), task="add", task_options={"digits": 2}, problems=3, samples=2,
                        max_new_tokens=8, out=str(tmp_path / "ev" / "results.json")))
    rows = [json.loads(x) for x in (tmp_path / "ev" / "results.traces.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * (1 + 2) and {r["method"] for r in rows} == {"greedy", "sample"}
    assert all(set(r) >= {"problem_id", "question", "gold", "completion", "answer", "correct", "finish_reason", "tokens",
                          "thinking_tokens", "forced_tokens", "majority", "well_formed"} for r in rows)


def test_eval_method_traces_carry_prm_step_scores_and_the_choice(tmp_path, char_tok):
    """`eval --method bon-prm`: every candidate of each pool, the chosen one flagged, each step with the PRM's
    score (the PRM's own cut of the completion); the trace page colours the steps and marks forced text."""
    from thinkforge.evaluate import EvalConfig, run_eval
    from thinkforge.models import save_model, tiny_model
    from thinkforge.scorers import RewardModel, split_steps

    model = save_model(tiny_model(char_tok, "micro"), char_tok, tmp_path / "m")
    from transformers import AutoModelForTokenClassification

    base = save_model(tiny_model(char_tok, "micro", seed=1), char_tok, tmp_path / "base")
    head = AutoModelForTokenClassification.from_pretrained(str(base), num_labels=1)
    head.config.thinkforge_rm = {"kind": "prm", "step_delimiter": "\n"}
    prm = tmp_path / "prm"
    head.save_pretrained(str(prm))
    char_tok.save_pretrained(str(prm))
    out = tmp_path / "runs" / "ev" / "results.json"
    run_eval(EvalConfig(model=str(model), task="add", task_options={"digits": 2}, problems=3, n=[3], method=["bon-prm"],
                        prm=str(prm), max_new_tokens=12, out=str(out)))
    rows = [json.loads(x) for x in out.with_suffix(".traces.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 and {r["method"] for r in rows} == {"bon-prm@3"}
    for pid in {r["problem_id"] for r in rows}:
        mine = [r for r in rows if r["problem_id"] == pid]
        assert sum(r["chosen"] for r in mine) == 1
        rm = RewardModel.load(str(prm), "cpu")
        from thinkforge.tasks import get_task
        task = get_task("add", digits=2)
        q = next(p for p in task.problems(3, "test") if p.id == pid)
        expect = rm.score([q.question] * 3, [r["completion"] for r in mine])
        for r, sc in zip(mine, expect):
            assert [s["text"] for s in r["steps"]] == split_steps(r["completion"])[1]
            assert [s["score"] for s in r["steps"]] == pytest.approx(sc, abs=1e-6)
        best = max(range(3), key=lambda k: (min(expect[k]), -k))  # bon-prm: the best min-aggregated score
        assert mine[best]["chosen"]
    c = TestClient(create_app(UIConfig(runs=str(tmp_path / "runs"), db=str(tmp_path / "l.sqlite"))))
    page = c.get("/trace/ev", params={"problem": rows[0]["problem_id"]}).text
    assert page.count("class='prm-step'") == sum(len(r["steps"]) for r in rows[:3]) and "class='chosen'" in page


def test_forced_text_is_marked_and_escaped():
    from thinkforge.ui import _completion_html

    text = "<think>a<b>\n</think>\n<answer>7</answer>"
    cut = text.index("\n</think>")
    got = _completion_html(text, [[cut, cut + len("\n</think>\n")]])
    assert got.count("<mark class='forced'") == 1 and "&lt;b&gt;" in got and "<b>" not in got
    before, rest = got.split("<mark", 1)
    inside, after = rest.split("'>", 1)[1].split("</mark>")
    assert (html.unescape(before), html.unescape(inside), html.unescape(after)) == (
        text[:cut], "\n</think>\n", text[cut + len("\n</think>\n") :])
    bad = [[5, 2], [0, 10**6], "x", [1, 2, 3]]
    assert "<mark" not in _completion_html(text, bad) and html.unescape(_completion_html(text, bad)) == text


STEPS = [{"question": f"{a}*3", "completion": f"<think>\n{a}*3={3 * a + k}\n{3 * a + k}+0={3 * a + k}\n</think>\n"
          f"<answer>{3 * a + k}</answer>"} for a in range(11, 15) for k in (0, 1)]


def test_step_marks_export_as_prm_labels_and_train_a_prm(tmp_path):
    from thinkforge.models import char_tokenizer, save_model, tiny_model
    from thinkforge.train.reward_model import RMConfig, read_labels, train_reward_model

    app = create_app(UIConfig(db=str(tmp_path / "l.sqlite")))
    store = app.state.store
    store.add_items("s", STEPS, mode="steps")
    with pytest.raises(LabelError, match="holds steps items, not ranking"):
        store.add_items("s", ITEMS)
    c = TestClient(app)
    page = c.get("/label/s", params={"labeller": "ana"}).text
    assert page.count("class='step'") == 3  # two thinking steps and the answer step
    while (item := c.get("/api/next/s", params={"labeller": "ana"}).json()) is not None:
        wrong = item["completions"][0].count(str(3 * int(item["prompt"].split("*")[0]) + 1)) > 0
        marks = [-1, -1, -1] if wrong else [1, 0, 1]
        assert c.post("/api/label", json={"item_id": item["item_id"], "labeller": "ana", "steps": marks}).status_code == 200
    bad = c.post("/api/label", json={"item_id": 1, "labeller": "bo", "steps": [1, 2, 1]})
    assert bad.status_code == 400 and "1 (good), 0 (neutral) or -1 (bad)" in bad.json()["error"]["message"]
    out = tmp_path / "steps.jsonl"
    msg = export(ExportConfig(db=str(tmp_path / "l.sqlite"), queue="s", format="steps", out=str(out)))
    assert "8 steps rows" in msg
    rows = read_labels(str(out))  # the PRM trainer's own reader: steps and labels line up
    assert len(rows) == 8 and sorted(tuple(r["labels"]) for r in rows)[0] == (0.0, 0.0, 0.0)
    assert {r["first_error"] for r in rows} == {0, None} and (1.0, 0.5, 1.0) in {tuple(r["labels"]) for r in rows}
    tok = char_tokenizer()
    policy = save_model(tiny_model(tok, "micro"), tok, tmp_path / "policy")
    run = train_reward_model(RMConfig(kind="prm", task="mul", data=str(out), policy=str(policy), steps=2, batch_size=4,
                                      out=str(tmp_path / "prm"), save_every=2, warmup=1, eval_problems=0))
    assert (run / "model" / "config.json").is_file()


def test_two_evaluations_paired_problem_by_problem(runs_client):
    from thinkforge.metrics import paired_bootstrap

    c, root = runs_client
    # A: problems p0..p3 with 2 samples each; B: the same problems, better on p1 and p2, plus a problem A lacks
    a = [_trace(f"p{i}", s, "x", "7", ok, method="sample") for i, oks in enumerate([(1, 1), (0, 0), (0, 1), (1, 0)])
         for s, ok in enumerate(oks)]
    b = [_trace(f"p{i}", s, "x", "7", ok, method="sample") for i, oks in enumerate([(1, 1), (1, 1), (1, 1), (1, 0), (0, 0)])
         for s, ok in enumerate(oks)]
    for name, rows in (("evA", a), ("evB", b)):
        (root / name).mkdir()
        (root / name / "results.traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = c.get("/pair", params={"a": "evA", "b": "evB"}).text
    expected = paired_bootstrap([1.0, 0.0, 0.5, 0.5], [1.0, 1.0, 1.0, 0.5])  # per-problem accuracy, A then B
    row = page.split("<tr><td>sample</td>")[1].split("</tr>")[0]
    assert "<td>4</td>" in row and "0.500" in row and "0.875" in row and f"{expected['diff']:+.3f}" in row
    assert f"[{expected['ci_low']:+.3f}, {expected['ci_high']:+.3f}]" in row
    assert row.count("/trace/evA?problem=") == 2  # p1 and p2 changed, each linked side by side
    assert c.get("/pair", params={"a": "evA", "b": "rm"}).status_code == 400  # nothing in common


def test_a_queue_sampled_from_a_model_and_a_task(tmp_path, char_tok):
    from thinkforge.models import save_model, tiny_model
    from thinkforge.ui import sample_queue

    model = save_model(tiny_model(char_tok, "micro"), char_tok, tmp_path / "m")
    cfg = UIConfig(db=str(tmp_path / "l.sqlite"), queue_model=str(model), queue_task="add", queue_prompts=3, queue_k=3,
                   queue_max_tokens=12)
    rows = sample_queue(cfg)
    assert len(rows) == 3 and all(len(r["completions"]) == 3 for r in rows)
    store = LabelStore(tmp_path / "l.sqlite")
    assert store.add_items("m", rows)["added"] == 3
    steps = sample_queue(UIConfig(**{**cfg.__dict__, "queue_mode": "steps"}))
    assert 1 <= len(steps) <= 9 and all(isinstance(r["completion"], str) for r in steps)
