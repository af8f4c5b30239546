"""Automatic prefix caching (opt-in, `--enable-prefix-caching`): the KV of prompt blocks seen before is copied into
a new row instead of being recomputed.

Prompts are cut into blocks of `block_size` tokens; a block is identified by a hash chained over every token up to
its end (as in vLLM), so a hit means the whole prefix matches. The store is a fixed pool of blocks per layer,
evicted least recently used. It is opt-in because a prefill that reads cached keys runs a different kernel
shape than a full prefill: logits move by ~1e-5 (fp32), which can flip a near-tie, so outputs are no longer
guaranteed identical to `generate()`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from genserve.scheduler.kv.slot_cache import SlotKVCache


class PrefixCache:
    def __init__(self, cache: SlotKVCache, max_tokens: int, block_size: int = 16) -> None:
        self.cache = cache
        self.block_size = block_size
        self.num_blocks = max(1, max_tokens // block_size)
        self.keys, self.values = [], []
        for layer in range(cache.num_layers):
            for pool, (heads, head_dim) in zip((self.keys, self.values), cache.layer_shapes(layer)):
                shape = (self.num_blocks, heads, block_size, head_dim)
                pool.append(torch.zeros(shape, dtype=cache.dtype, device=cache.device))
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # chained hash -> pool index, least recent first
        self._free = list(range(self.num_blocks))
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of which served from the cache
        self.evicted_blocks = 0  # blocks dropped, least recently used first, to make room

    def _chain(self, tokens: list[int]) -> list[bytes]:
        """The chained hash of each full block of `tokens`."""
        digests, previous = [], b""
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            block = array("q", tokens[start : start + self.block_size]).tobytes()
            previous = hashlib.blake2b(previous + block, digest_size=16).digest()
            digests.append(previous)
        return digests

    def load(self, tokens: list[int], row: int) -> int:
        """Copy the longest cached prefix of `tokens` (leaving at least the last token to compute) into `row`'s
        slot; returns how many tokens it covers."""
        blocks = []
        for digest in self._chain(tokens[:-1]):
            index = self._blocks.get(digest)
            if index is None:
                break
            self._blocks.move_to_end(digest)
            blocks.append(index)
        self.queried_tokens += len(tokens)
        length = len(blocks) * self.block_size
        self.hit_tokens += length
        if blocks:
            index = torch.tensor(blocks, device=self.cache.device)
            for layer in range(self.cache.num_layers):  # [n, heads, block, dim] -> [heads, n * block, dim]
                keys, values = (pool[layer][index].transpose(0, 1).flatten(1, 2) for pool in (self.keys, self.values))
                self.cache.write_row(layer, row, 0, keys, values)
        return length

    def store(self, tokens: list[int], row: int) -> None:
        """Keep the full blocks of `tokens` (now in `row`'s slot) that the pool does not hold yet: a prompt after
        its prefill, a whole conversation when its row leaves."""
        chain = self._chain(tokens)
        numbers, indexes = [], []
        for number, digest in enumerate(chain):
            if digest in self._blocks:
                self._blocks.move_to_end(digest)
                continue
            if self._free:
                index = self._free.pop()
            else:
                index = self._blocks.popitem(last=False)[1]
                self.evicted_blocks += 1
            self._blocks[digest] = index
            numbers.append(number)
            indexes.append(index)
        if not numbers:
            return
        source = torch.tensor(numbers, device=self.cache.device)
        destination = torch.tensor(indexes, device=self.cache.device)
        length = len(chain) * self.block_size
        for layer in range(self.cache.num_layers):
            for pool, held in zip((self.keys, self.values), self.cache.read_row(layer, row, length)):
                blocks = held.unflatten(1, (len(chain), self.block_size)).transpose(0, 1)  # [n, heads, block, dim]
                pool[layer][destination] = blocks[source]
