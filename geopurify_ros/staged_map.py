"""A view of a VoxelMap whose channel writes are held back until `commit`: purification computes on it while readers
(queries, cloud publishing, saving) keep using the map, and only the commit needs exclusive access.

It implements the map contract the Purifier uses (docs/ARCHITECTURE.md): reads go to the map, except channels this
pass wrote or created, which read back their staged state; `set_channel`, `add_channel` and `clear_dirty` are
recorded. The map must not be written by anyone else between `begin` and `commit` (the pipeline holds its writer
mutex for the whole pass). One StagedMap is kept per VoxelMap object, so a Purifier that keys its incremental state
on the map object's identity sees the same object on every pass.
"""
from __future__ import annotations

import torch

COMMIT_BLOCK_ROWS = 16384    # rows per commit block (~12 MB of 384-d float16): the longest a reader waits


class StagedMap:
    def __init__(self, vmap) -> None:
        self.map = vmap
        self.begin()

    def begin(self) -> None:
        """Forget what a previous pass staged."""
        self._new: dict[str, tuple] = {}                      # channels created by this pass: spec
        self._copies: dict[str, torch.Tensor] = {}            # full staged copies of channels read after a write
        self._writes: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}   # (slots, values) in write order
        self._clear_dirty = False

    # ------------------------------------------------------------------ reads (the map, or what this pass staged)
    def __len__(self) -> int:
        return len(self.map)

    def __getattr__(self, name):            # xyz, colors, features, keys, voxel_size, neighbours, lookup, ...
        return getattr(self.map, name)

    def channel_names(self) -> list[str]:
        return self.map.channel_names() + [n for n in self._new if n not in self.map.channel_names()]

    def channel(self, name: str) -> torch.Tensor:
        if name in self._copies:
            return self._copies[name]
        if name not in self._writes:
            return self.map.channel(name)
        copy = self.map.channel(name).clone()
        for slots, values in self._writes[name]:
            copy[slots] = values
        self._copies[name] = copy
        return copy

    def dirty_slots(self) -> torch.Tensor:
        return self.map.dirty_slots()[:0] if self._clear_dirty else self.map.dirty_slots()

    # ------------------------------------------------------------------ writes (staged)
    def add_channel(self, name: str, trailing_shape=(), dtype=torch.float32, fill=0) -> None:
        if name in self.map.channel_names():
            self.map.add_channel(name, trailing_shape, dtype, fill)   # identical spec: no-op; else ValueError
            return
        shape = tuple(int(s) for s in (trailing_shape if isinstance(trailing_shape, (tuple, list))
                                       else (trailing_shape,)))
        self._new[name] = (shape, dtype, fill)
        self._copies[name] = torch.full((len(self.map), *shape), fill, dtype=dtype, device=self.map.device)

    def set_channel(self, name: str, slots, values) -> None:
        if name not in self._copies and name not in self.map.channel_names():
            raise ValueError(f"name: no channel '{name}'")
        dtype = self._copies[name].dtype if name in self._copies else self.map.channel(name).dtype
        slots = torch.as_tensor(slots, dtype=torch.int64, device=self.map.device).reshape(-1)
        values = values.to(device=self.map.device, dtype=dtype)
        if name in self._copies:
            self._copies[name][slots] = values
        self._writes.setdefault(name, []).append((slots, values))

    def clear_dirty(self) -> None:
        self._clear_dirty = True

    # ------------------------------------------------------------------ commit
    def commit_blocks(self, block_rows: int | None = None):
        """Apply the staged writes to the map, yielding (channel name, slots) after each block of at most
        `block_rows` written rows.

        The caller holds exclusive access while a block is applied and may release it at each yield: every row is
        either before or after the pass, and the dirty set (which marks rows whose staged result is pending) is
        cleared only after the last block.
        """
        block_rows = block_rows or COMMIT_BLOCK_ROWS
        for name, (shape, dtype, fill) in self._new.items():
            if name not in self.map.channel_names():
                self.map.add_channel(name, shape, dtype, fill)
        for name, writes in self._writes.items():
            for slots, values in writes:
                for i in range(0, slots.numel(), block_rows):
                    self.map.set_channel(name, slots[i:i + block_rows], values[i:i + block_rows])
                    yield name, slots[i:i + block_rows]
        if self._clear_dirty:
            self.map.clear_dirty()
        self.begin()
