"""A readers-writer lock: many readers at once, or one writer; writers are preferred.

Why: the map is read by queries, cloud publishing and saving while the worker thread writes it (fusion, the commit
of a purification pass). Readers only exclude writers, so a query never waits for another query, and a purification
pass that computes while holding the read side lets queries run meanwhile. Waiting writers block new readers, so a
stream of queries cannot starve the worker.

Read acquisitions are re-entrant per thread (a reader may call another reading method); a thread that holds the
read side must not ask for the write side (that would wait for itself).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None        # thread id of the writer holding the lock
        self._writers_waiting = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def read(self):
        me = threading.get_ident()
        depth = self._depth()
        if depth or self._writer == me:       # re-entrant read (or a read inside this thread's own write)
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._cond:
            while self._writer is not None or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        me = threading.get_ident()
        if self._depth():
            raise RuntimeError("RWLock: write requested while this thread holds the read side")
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()
