"""Reuse of the KV cache across requests: keep what the longest common prefix allows, trim the rest.

The sliding-window caches keep rollback slack, so the few tokens that differ at the end of the
previous turn (the template's turn markers, a stop string) can be trimmed even after the window has
wrapped. When more than the slack differs, the cache starts over: slower, never wrong.
"""

import json
import os
from pathlib import Path

import mlx.core as mx



FORMAT = "mlx-gemma4-prompt-cache/1"


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    def __init__(self, model, kv_quant=None):
        self.model = model
        self.kv_quant = kv_quant  # quantized_cache.KVQuantConfig of the caches; None: bf16
        self.tokens: list[int] = []  # the tokens whose keys/values the caches hold
        self.cache = model.make_cache(kv_quant=kv_quant)

    def prepare(self, prompt: list[int]) -> tuple[list[int], list]:
        """The part of `prompt` still to be run, and the caches to run it with."""
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)  # at least one token yields logits
        drop = len(self.tokens) - keep
        if drop and all(c.can_trim(drop) for c in self.cache):
            for c in self.cache:
                c.trim(drop)
        elif drop:
            self.cache, keep = self.model.make_cache(kv_quant=self.kv_quant), 0
        self.tokens = list(prompt)
        return list(prompt[keep:]), self.cache

    def append(self, token: int):
        self.tokens.append(token)

    def save(self, path):
        """Write the caches and their tokens to one safetensors file (atomically)."""
        arrays, kinds = {}, []
        for i, c in enumerate(self.cache):
            kinds.append(type(c).__name__)
            for j, array in enumerate(c.state if c.offset else ()):
                arrays[f"{i}.{j}"] = array
        metadata = {"format": FORMAT, "tokens": json.dumps(self.tokens), "kinds": json.dumps(kinds),
                    "kv_quant": repr(self.kv_quant)}
        path = Path(path)
        tmp = path.with_name(path.name + ".partial.safetensors")
        mx.save_safetensors(str(tmp), arrays, metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, model, kv_quant=None) -> "PromptCache":
        arrays, metadata = mx.load(str(path), return_metadata=True)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an mlx-gemma4 prompt cache")
        kinds = json.loads(metadata["kinds"])
        if metadata.get("kv_quant", "None") != repr(kv_quant):
            raise ValueError(f"{path} holds a {metadata.get('kv_quant')} KV cache, not {kv_quant!r}")
        prompt_cache = cls(model, kv_quant)
        if kinds != [type(c).__name__ for c in prompt_cache.cache]:
            raise ValueError(f"{path} was saved for a model with a different layer layout")
        for i, c in enumerate(prompt_cache.cache):
            parts = [arrays[k] for k in sorted((k for k in arrays if k.split(".")[0] == str(i)), key=lambda k: int(k.split(".")[1]))]
            if parts:
                c.state = tuple(parts)
        prompt_cache.tokens = json.loads(metadata["tokens"])
        return prompt_cache



