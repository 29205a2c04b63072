import pytest

from rlserve.batching import BatchPolicy


def test_greedy_by_default_runs_whatever_is_pending():
    p = BatchPolicy(32)
    assert p.wait_time(1, oldest_arrival=100.0, now=100.0) == 0.0


def test_deadline_counts_from_oldest_arrival():
    p = BatchPolicy(32, min_batch_size=8, timeout=0.010)
    # oldest arrived 4 ms ago: 6 ms left, whatever the server did meanwhile
    assert p.wait_time(3, oldest_arrival=10.000, now=10.004) == pytest.approx(0.006)
    assert p.wait_time(3, oldest_arrival=10.000, now=10.011) == 0.0
    assert p.wait_time(8, oldest_arrival=10.000, now=10.000) == 0.0


@pytest.mark.parametrize("kw", [dict(max_batch_size=0), dict(max_batch_size=4, min_batch_size=5),
                                dict(max_batch_size=4, min_batch_size=0), dict(max_batch_size=4, timeout=-1)])
def test_bad_settings_are_rejected(kw):
    with pytest.raises(ValueError):
        BatchPolicy(**kw)
