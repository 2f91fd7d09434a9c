"""Approximate-time colour/depth pairing and keyframe selection (geopurify_ros/node/sync.py)."""
import numpy as np
import pytest

from geopurify_ros.node.sync import ApproximateTimeSync, KeyframeSelector, rotation_angle_deg


def make(slop=0.02, queue_size=5):
    pairs = []
    return ApproximateTimeSync(lambda a, b: pairs.append((a, b)), slop, queue_size), pairs


def test_pairs_nearest_within_slop_in_either_arrival_order():
    s, pairs = make()
    assert not s.add(0, 1.000, "c1")
    assert s.add(1, 1.010, "d1")          # depth after colour
    assert not s.add(1, 2.000, "d2")
    assert s.add(0, 1.995, "c2")          # colour after depth
    assert pairs == [("c1", "d1"), ("c2", "d2")]   # always (colour, depth) order


def test_no_pair_outside_slop_and_picks_nearest_candidate():
    s, pairs = make(slop=0.02)
    s.add(1, 1.00, "d_far")
    assert not s.add(0, 1.05, "c")        # 50 ms away: no pair
    s.add(1, 1.06, "d_near")              # 10 ms from c -> pairs with c
    assert pairs == [("c", "d_near")]
    s2, pairs2 = make(slop=0.05)
    s2.add(1, 1.00, "d0")
    s2.add(1, 1.03, "d1")
    s2.add(0, 1.025, "c")                 # d1 is nearer (5 ms) than d0 (25 ms)
    assert pairs2 == [("c", "d1")]


def test_older_messages_are_discarded_after_a_pair_and_never_paired_backwards():
    s, pairs = make(slop=0.02)
    s.add(0, 1.0, "c_old")                # never matched
    s.add(0, 2.0, "c")
    s.add(1, 2.0, "d")
    assert pairs == [("c", "d")]
    assert not s.add(1, 1.0, "d_late")    # older than the emitted pair: dropped, not paired with c_old
    assert pairs == [("c", "d")]
    assert s.dropped == 2                 # c_old superseded + d_late


def test_queue_is_bounded_drop_oldest():
    s, pairs = make(slop=0.001, queue_size=3)
    for i in range(10):
        s.add(0, float(i), f"c{i}")
    assert s.dropped == 7
    assert s.add(1, 9.0, "d9") and pairs == [("c9", "d9")]
    s.reset()
    assert not s.add(1, 0.5, "d")         # reset forgets the emitted horizon too
    assert s.add(0, 0.5, "c")


def test_out_of_order_arrival_within_a_stream():
    s, pairs = make(slop=0.01)
    s.add(0, 2.0, "c2")
    s.add(0, 1.0, "c1")                   # arrives late but still queued in stamp order
    s.add(1, 1.0, "d1")
    s.add(1, 2.0, "d2")
    assert pairs == [("c1", "d1"), ("c2", "d2")]


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="sync_slop_s"):
        ApproximateTimeSync(print, slop=-1)
    with pytest.raises(ValueError, match="sync_queue_size"):
        ApproximateTimeSync(print, queue_size=0)


def rot_z(deg, t=(0, 0, 0)):
    a = np.radians(deg)
    T = np.eye(4)
    T[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    T[:3, 3] = t
    return T


def test_keyframe_by_translation_rotation_and_time():
    k = KeyframeSelector(min_translation_m=0.1, min_rotation_deg=10, max_interval_s=1.0)
    assert k.is_keyframe(0.0, np.eye(4))
    k.accept(0.0, np.eye(4))
    assert not k.is_keyframe(0.1, rot_z(0, (0.05, 0, 0)))
    assert k.is_keyframe(0.1, rot_z(0, (0.1, 0, 0)))
    assert not k.is_keyframe(0.1, rot_z(9))
    assert k.is_keyframe(0.1, rot_z(11))
    assert k.is_keyframe(1.0, np.eye(4))          # time trigger
    assert not k.is_keyframe(-1.0, rot_z(90))     # older than the last keyframe
    k.accept(1.0, rot_z(11))
    assert not k.is_keyframe(1.5, rot_z(15))      # relative to the new keyframe now
    k.reset()
    assert k.is_keyframe(0.0, np.eye(4))


def test_time_trigger_off_with_zero_interval():
    k = KeyframeSelector(0.1, 10, max_interval_s=0)
    k.accept(0.0, np.eye(4))
    assert not k.is_keyframe(100.0, np.eye(4))
    assert rotation_angle_deg(np.eye(3), rot_z(30)[:3, :3]) == pytest.approx(30)


def test_every_discarded_message_is_reported_with_a_reason():
    details = []
    s = ApproximateTimeSync(lambda a, b: None, slop=2, queue_size=2, on_drop=details.append)
    ns = 1_700_000_000_000_000_000                   # integer nanosecond stamps, slop in the same unit
    for k in range(4):
        s.add(0, ns + 100 * k, f"c{k}")              # 2 overflow the queue
    assert s.add(1, ns + 301, "d")                   # pairs with c3, supersedes nothing left
    s.add(1, ns + 5, "late")                         # older than the pair
    assert s.dropped == len(details) == 4
    assert sum("overflowed" in d for d in details) == 2
    assert any("not after the last pair" in d for d in details)
    assert any("superseded" in d for d in details)
