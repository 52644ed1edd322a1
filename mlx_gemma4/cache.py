"""Key/value caches for the Gemma 4 decoder.

- `FullCache`: global-attention layers; grows in preallocated steps.
- `SlidingCache`: sliding-window layers; a ring of `window - 1 + rollback` slots, so that after the
  window has wrapped the last `rollback` tokens can still be trimmed (speculative decoding, prompt
  reuse) and every query keeps its full window.
KV-shared layers own no cache: they reuse the keys/values their producer layer returns.

Both caches know the absolute position of every key slot they hand to attention (`key_positions`),
which is what masks are built from; left-padded batches carry their padding per row. Positions are
host-side numpy bookkeeping: a decode step then costs no extra device operations for it.
"""

from typing import Optional

import mlx.core as mx
import numpy as np

GROWTH_STEP = 256
DEFAULT_ROLLBACK = 32


class FullCache:
    def __init__(self, left_padding: Optional[np.ndarray] = None):
        self.keys = None
        self.values = None
        self.offset = 0
        self.left_padding = left_padding

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        end = self.offset + length
        if self.keys is None or end > self.keys.shape[2]:
            capacity = (end + GROWTH_STEP - 1) // GROWTH_STEP * GROWTH_STEP
            self.keys = _grow(self.keys, keys, capacity, self.offset)
            self.values = _grow(self.values, values, capacity, self.offset)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def key_positions(self, length: int) -> np.ndarray:
        """Positions of the keys the next `update_and_fetch` of `length` tokens will return."""
        return np.arange(self.offset + length)

    def covers_window(self, length: int, window: int) -> bool:
        return True

    def trim(self, count: int) -> int:
        count = min(count, self.offset)
        self.offset -= count
        return count

    def can_trim(self, count: int) -> bool:
        return count <= self.offset

    @property
    def state(self):
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value):
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlidingCache:
    """A ring buffer of `window - 1 + rollback` key/value slots.

    A single-token update writes one slot in place. A multi-token update returns the retained
    tokens (in temporal order) followed by the new ones, so each new query sees its whole window,
    then keeps only the newest `capacity` tokens. `filled` slots are valid; in temporal order they
    start at slot `write - filled` (mod capacity).
    """

    def __init__(self, window: int, rollback: int = DEFAULT_ROLLBACK, left_padding: Optional[np.ndarray] = None):
        self.window = window
        self.rollback = rollback
        self.capacity = window - 1 + rollback
        self.keys = None
        self.values = None
        self.positions = None  # absolute position held by each slot, -1 for empty
        self.write = 0  # next slot a single-token update writes
        self.filled = 0
        self.offset = 0
        self.left_padding = left_padding

    def _temporal(self):
        """Valid keys, values and positions, oldest -> newest."""
        if self.filled == 0:
            return None
        order = (np.arange(self.filled) + (self.write - self.filled)) % self.capacity
        slots = mx.array(order)
        return self.keys[..., slots, :], self.values[..., slots, :], self.positions[order]

    def _store(self, keys, values, positions):
        """Keep the newest `capacity` of these (temporally ordered) tokens, at slots 0, 1, ..."""
        kept = min(keys.shape[2], self.capacity)
        self.keys = _pad_slots(keys[..., keys.shape[2] - kept :, :], self.capacity, 2)
        self.values = _pad_slots(values[..., values.shape[2] - kept :, :], self.capacity, 2)
        self.positions = np.full(self.capacity, -1, np.int64)
        self.positions[:kept] = positions[len(positions) - kept :]
        self.filled = kept
        self.write = kept % self.capacity

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        if length == 1 and self.keys is not None:
            return self._write_one(keys, values)
        new_positions = np.arange(self.offset, self.offset + length)
        old = self._temporal()
        if old is None:
            all_k, all_v, all_p = keys, values, new_positions
        else:
            all_k = mx.concatenate([old[0], keys], axis=2)
            all_v = mx.concatenate([old[1], values], axis=2)
            all_p = np.concatenate([old[2], new_positions])
        self.offset += length
        self._store(all_k, all_v, all_p)
        return all_k, all_v

    def _write_one(self, keys, values):
        slot = self.write
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.positions[slot] = self.offset
        self.offset += 1
        self.write = (slot + 1) % self.capacity
        self.filled = min(self.filled + 1, self.capacity)
        return self.keys, self.values

    def key_positions(self, length: int) -> np.ndarray:
        """Positions of the keys the next `update_and_fetch` of `length` tokens will return."""
        new_positions = np.arange(self.offset, self.offset + length)
        if self.keys is None:
            return new_positions
        if length == 1:
            positions = self.positions.copy()
            positions[self.write] = self.offset
            return positions
        order = (np.arange(self.filled) + (self.write - self.filled)) % self.capacity
        return np.concatenate([self.positions[order], new_positions])

    def covers_window(self, length: int, window: int) -> bool:
        """True when a plain causal mask is exact: only new keys are returned, all inside the window."""
        return self.keys is None and length <= window

    def can_trim(self, count: int) -> bool:
        if count > self.offset:
            return False
        # After trimming, the next query still needs its window - 1 predecessors.
        return min(self.offset - count, self.window - 1) <= self.filled - count

    def trim(self, count: int) -> int:
        if not self.can_trim(count):
            raise ValueError(
                f"cannot roll back {count} tokens: this sliding cache keeps {self.rollback} tokens of slack"
            )
        if count:
            keys, values, positions = self._temporal()
            keep = self.filled - count
            self.offset -= count
            self._store(keys[..., :keep, :], values[..., :keep, :], positions[:keep])
        return count

    @property
    def state(self):
        keys, values, positions = self._temporal()
        return keys, values, mx.array(positions)

    @state.setter
    def state(self, value):
        keys, values, positions = value
        positions = np.array(positions)
        self.offset = int(positions[-1]) + 1
        self._store(keys, values, positions)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _grow(old: Optional[mx.array], like: mx.array, capacity: int, used: int) -> mx.array:
    shape = (*like.shape[:2], capacity, like.shape[3])
    grown = mx.zeros(shape, like.dtype)
    if old is not None and used:
        grown[..., :used, :] = old[..., :used, :]
    return grown


def _pad_slots(array: mx.array, capacity: int, axis: int) -> mx.array:
    """Pad `array` along `axis` to `capacity` slots (a ring that has not filled yet)."""
    missing = capacity - array.shape[axis]
    if missing <= 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, missing)
    return mx.pad(array, widths)
