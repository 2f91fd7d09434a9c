"""Time-jump handling (geopurify_ros/node/time_guard.py): clock jumps, stream restarts, far-future stamps."""
import pytest

from geopurify_ros.node.msg_convert import FrameRejected
from geopurify_ros.node.time_guard import TimeJumpGuard

S = 1_000_000_000


def make(tol_s=2.0):
    restarts = []
    return TimeJumpGuard(int(tol_s * S), restarts.append), restarts


def feed(g, stamps_s, now_s, stream="pose"):
    for t in stamps_s:
        g.check(stream, int(t * S), int(now_s * S))


def test_steady_stamps_and_small_jitter_pass():
    g, restarts = make()
    feed(g, [100.0, 100.1, 100.05, 100.2], 100.2)       # 50 ms out of order: the consumers judge that
    feed(g, [102.1], 100.2)                             # 1.9 s ahead of the clock: within tolerance
    assert restarts == []


def test_far_future_stamp_is_rejected_and_does_not_poison_later_stamps():
    g, restarts = make()
    feed(g, [100.0], 100.0)
    with pytest.raises(FrameRejected) as e:
        g.check("pose", (100 + 10**6) * S, 100 * S)
    assert e.value.reason == "stamp_future" and "ahead of the node clock" in e.value.detail
    feed(g, [100.1, 100.2], 100.2)                      # later valid stamps: no restart, no rejection
    assert restarts == []


def test_clock_zero_cannot_judge_the_future():
    g, _ = make()
    feed(g, [1.7e9], 0.0)                               # use_sim_time before the first /clock


def test_clock_jumping_back_restarts_once():
    g, restarts = make()
    feed(g, [100.0, 105.0, 109.0], 109.0)
    feed(g, [100.0], 100.0)                             # /clock restarted with the bag loop
    assert len(restarts) == 1 and "ROS time jumped back 9.000 s" in restarts[0]
    feed(g, [100.1, 100.2], 100.2)
    assert len(restarts) == 1
    feed(g, [100.3], 100.1999)                          # any backward step of the clock counts (as in tf2)
    assert len(restarts) == 2


def test_stream_stepping_back_restarts_without_a_clock_jump():
    g, restarts = make()
    feed(g, [100.0, 110.0], 2e9)                        # wall clock, bag stamps in the past
    feed(g, [108.5], 2e9)                               # 1.5 s back: within tolerance, left to the consumers
    assert restarts == []
    feed(g, [100.0], 2e9)                               # bag looped without /clock
    assert len(restarts) == 1 and "pose stamps jumped back" in restarts[0]
    feed(g, [100.1, 100.2], 2e9)
    assert len(restarts) == 1
    feed(g, [200.0], 2e9, stream="colour")              # streams are judged separately
    feed(g, [100.3], 2e9, stream="pose")
    assert len(restarts) == 1


def test_data_before_clock_is_one_jump_not_two():
    # the looped bag's first messages overtake its /clock: the data restarts us, the clock jump is the same event
    g, restarts = make()
    feed(g, [105.0, 109.0], 109.0)
    feed(g, [100.0], 109.0)
    assert len(restarts) == 1
    feed(g, [100.1], 100.05)
    assert len(restarts) == 1
    # ... but a clock jump that leaves held stamps ahead of the new clock still restarts
    feed(g, [130.0], 130.0)
    feed(g, [121.0], 121.0)
    assert len(restarts) == 2


def test_in_flight_stamps_from_before_a_clock_jump_are_rejected():
    g, restarts = make()
    feed(g, [109.0], 109.0)
    feed(g, [100.0], 100.0)
    assert len(restarts) == 1
    with pytest.raises(FrameRejected):
        g.check("depth", int(109.0 * S), int(100.0 * S))   # the old pass's last depth image, delivered late


def test_reset_forgets_stamps():
    g, restarts = make()
    feed(g, [110.0], 2e9)
    g.reset()
    feed(g, [100.0], 2e9)
    assert restarts == []


def test_tolerance_must_be_positive():
    with pytest.raises(ValueError, match="max_time_jump_s"):
        TimeJumpGuard(0, print)
