"""Prompt-cache reuse across requests: an LRU of PromptCaches, one per recent conversation.

A request takes the idle entry that its prompt continues (the next turn of a conversation repeats the
previous prompt and answer); `PromptCache.prepare` then trims what differs, or starts over when a
sliding window can no longer roll back that far: slower, never wrong. An entry is checked out while
a request generates with it, so two requests never write one cache.
"""

from collections import OrderedDict

from ..prompt_cache import PromptCache, common_prefix


def reusable(entry: PromptCache, prompt: list[int]) -> int:
    """How many cached tokens `prepare(prompt)` would keep (0 when it would have to start over)."""
    keep = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
    drop = len(entry.tokens) - keep
    return keep if all(c.can_trim(drop) for c in entry.cache) else 0


class SessionPool:
    def __init__(self, model, capacity: int, kv_quant=None):
        self.model = model
        self.capacity = capacity
        self.kv_quant = kv_quant  # quantized_cache.KVQuantConfig of new caches; None: bf16
        self._idle: OrderedDict[int, PromptCache] = OrderedDict()  # least recently used first

    def checkout(self, prompt: list[int]) -> PromptCache:
        """The idle cache whose tokens `prompt` mostly continues, else a fresh one.

        An entry is taken only when at least half of it is reused, so an unrelated conversation
        that merely shares the template's first tokens does not overwrite another's cache.
        """
        best, best_keep = None, 0
        for key, entry in self._idle.items():
            keep = reusable(entry, prompt)
            if keep > best_keep and 2 * keep >= len(entry.tokens):
                best, best_keep = key, keep
        if best is None:
            return PromptCache(self.model, self.kv_quant)
        return self._idle.pop(best)

    def checkin(self, entry: PromptCache):
        if self.capacity <= 0 or not entry.tokens:
            return
        self._idle[id(entry)] = entry
        while len(self._idle) > self.capacity:
            self._idle.popitem(last=False)

    def clear(self):
        self._idle.clear()

    def __len__(self) -> int:
        return len(self._idle)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for entry in self._idle.values() for c in entry.cache)
