"""Which kernels tuning leaves at their default schedule: the share rule, without any IR."""

from hwcompress.tuning import MIN_SHARE, small_tasks


def test_share_counts_how_often_a_kernel_runs():
    cost = {"conv": 1.0, "pool": 0.004, "add": 0.002}
    # add runs 10 times: 0.02 / 1.024 = 2% of the time, kept; pool 0.4%, dropped
    small = small_tasks(cost, {"conv": 1, "pool": 1, "add": 10}, MIN_SHARE)
    assert set(small) == {"pool"}
    assert small["pool"] == "0.39% of time"


def test_nothing_is_small_when_everything_matters():
    assert small_tasks({"a": 1.0, "b": 1.0}, {"a": 1, "b": 1}, 0.005) == {}


def test_reason_names_the_measure():
    assert small_tasks({"big": 100.0, "tiny": 0.0}, {"big": 1, "tiny": 1}, 0.005, "FLOPs") == {"tiny": "0% of FLOPs"}
