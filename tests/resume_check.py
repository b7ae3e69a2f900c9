"""Exact resume, checked the same way for every trainer: kill a run at its 4th loss computation, resume
it, and compare its metrics with an uninterrupted run's (timing columns aside)."""
import json

import pytest


def crash_then_resume(monkeypatch, module, make, cfg_of, tmp_path):
    """Run once uninterrupted and once killed at the 4th loss call then resumed: the metrics must match."""
    full = make(cfg_of(tmp_path / "a"))
    expected = (full / "metrics.jsonl").read_text().splitlines()
    real, calls = module.make_loss_fn, {"n": 0}

    def crashing(*args):
        fn = real(*args)

        def wrapped(model, mb):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return fn(model, mb)

        return wrapped

    monkeypatch.setattr(module, "make_loss_fn", crashing)
    with pytest.raises(KeyboardInterrupt):
        make(cfg_of(tmp_path / "b"))
    monkeypatch.setattr(module, "make_loss_fn", real)
    make(cfg_of(tmp_path / "b", resume=True))
    got = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k not in ("step_time", "tokens_per_s", "gen_time")} for r in rows]
    assert strip(got) == strip(expected)
    if (full / "traces.jsonl").exists():  # what the UI shows: the roll-outs of every batch, once
        assert (tmp_path / "b" / "traces.jsonl").read_text() == (full / "traces.jsonl").read_text()
