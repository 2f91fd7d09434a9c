"""RWLock: concurrent readers, exclusive writers, writer preference, re-entrant reads."""
import threading
import time

import pytest

from geopurify_ros.rwlock import RWLock


def run(fn):
    th = threading.Thread(target=fn, daemon=True)
    th.start()
    return th


def test_readers_share_and_writer_excludes():
    lock = RWLock()
    inside = threading.Barrier(3, timeout=5)

    def reader():
        with lock.read():
            inside.wait()                 # all three readers inside at once, or the barrier times out
    threads = [run(reader) for _ in range(2)]
    with lock.read():
        inside.wait()
    for th in threads:
        th.join(5)
    events = []

    def writer():
        with lock.write():
            events.append("w")
    with lock.read():
        th = run(writer)
        time.sleep(0.1)
        assert events == []              # the writer waits for the reader
    th.join(5)
    assert events == ["w"]


def test_waiting_writer_blocks_new_readers_but_not_reentrant_ones():
    lock = RWLock()
    order = []
    release = threading.Event()

    def long_reader():
        with lock.read():
            order.append("r1")
            release.wait(5)
            with lock.read():            # re-entrant while a writer waits: must not deadlock
                order.append("r1-nested")

    def writer():
        with lock.write():
            order.append("w")

    def late_reader():
        with lock.read():
            order.append("r2")

    t1 = run(long_reader)
    time.sleep(0.05)
    t2 = run(writer)
    time.sleep(0.05)
    t3 = run(late_reader)
    time.sleep(0.05)
    assert order == ["r1"]               # writer waits for r1; r2 waits behind the writer
    release.set()
    for th in (t1, t2, t3):
        th.join(5)
    assert order == ["r1", "r1-nested", "w", "r2"]


def test_write_inside_read_is_an_error_not_a_deadlock():
    lock = RWLock()
    with lock.read():
        with pytest.raises(RuntimeError, match="read side"):
            with lock.write():
                pass
    with lock.write():                   # the lock is still usable
        with lock.read():                # a writer may read what it holds
            pass
