"""SIGKILL at random moments (the bench runs 10 trials; the suite runs 2): nothing lost, nothing changed."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))


@pytest.mark.timeout(240)
def test_sigkill_and_resume_gives_the_uninterrupted_metrics():
    import ranks
    from crash_resume import run_trials

    ranks.warm()  # forked processes: the kills land in training, not in the seconds of imports
    s = run_trials("sft", trials=2, seed=1, launch=ranks.Process, max_kills=3)
    assert s["kills"] >= 1, s  # the trials did kill the trainer
    assert s == {**s, "identical": 2, "broken_checkpoints": 0}
