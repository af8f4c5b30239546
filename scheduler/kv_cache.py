"""A slot-per-row KV cache that HF attention layers write into through the `cache.update(...)` hook.

Running rows always occupy slots 0..B-1, so a decode step reads one contiguous prefix of the slot dimension and
never gathers rows; a leaving row's slot is filled by moving the last row into it (one small copy per layer).
Each row's tokens start at position 0 of its slot: no padding lives in the cache, the attention mask only hides
positions past each row's own length. Capacity along the token axis grows by doubling, so a step never allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Pass:
    """Where the current forward pass writes: prefill of rows [first_row, first_row+n), or decode of rows [0, n)."""

    is_prefill: bool
    first_row: int
    num_rows: int
    offset: int = 0  # prefill: positions already in the slot (a cached prefix) that attention also reads
    positions: torch.Tensor | None = None  # decode: [rows, queries] write positions
    read_length: int = 0  # decode: how many positions attention reads


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        num_kv_heads: int,
        head_dim: int,
        max_context: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_capacity: int = 256,
        spare_positions: int = 0,
    ) -> None:
        """`spare_positions` past `max_context` take the writes of speculative steps near the end of the context
        (their proposals are cut at the context, but the batched pass still writes them)."""
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_positions = max_context + spare_positions
        self.dtype = dtype
        self.device = device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._pass: _Pass | None = None
        self.ensure_capacity(min(initial_capacity, max_context))

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_rows: int, max_context: int, spare_positions: int) -> SlotKVCache:
        """A cache shaped for this HF model's attention layers, in its dtype and on its device."""
        config = model.config.get_text_config()
        num_heads = config.num_attention_heads
        parameter = next(model.parameters())
        return cls(
            num_layers=config.num_hidden_layers,
            max_rows=max_rows,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            max_context=max_context,
            dtype=parameter.dtype,
            device=parameter.device,
            spare_positions=spare_positions,
        )

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def ensure_capacity(self, num_positions: int) -> None:
        if num_positions <= self.capacity:
            return
        new_capacity = max(self.capacity, 1)
        while new_capacity < num_positions:
            new_capacity *= 2
        new_capacity = min(new_capacity, self.max_positions)
        shape = (self.max_rows, self.num_kv_heads, new_capacity, self.head_dim)
        for layer_caches in (self.keys, self.values):
            for layer in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if layer_caches and self.capacity:
                    grown[:, :, : self.capacity] = layer_caches[layer]
                if len(layer_caches) > layer:
                    layer_caches[layer] = grown
                else:
                    layer_caches.append(grown)
        self.capacity = new_capacity

    def begin_prefill(self, first_row: int, num_rows: int, offset: int = 0) -> None:
        self._pass = _Pass(is_prefill=True, first_row=first_row, num_rows=num_rows, offset=offset)

    def begin_decode(self, positions: torch.Tensor, read_length: int) -> None:
        self._pass = _Pass(
            is_prefill=False, first_row=0, num_rows=positions.shape[0], positions=positions, read_length=read_length
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hook HF attention calls with this layer's new keys/values; returns what attention should read."""
        current = self._pass
        if current is None:
            raise RuntimeError("cache.update() outside a pass started by begin_prefill() or begin_decode()")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if current.is_prefill:
            rows = slice(current.first_row, current.first_row + current.num_rows)
            end = current.offset + key_states.shape[2]
            keys[rows, :, current.offset : end] = key_states
            values[rows, :, current.offset : end] = value_states
            if current.offset:  # after a cached prefix: attention reads it too
                return keys[rows, :, :end], values[rows, :, :end]
            # New rows have no earlier context: attention reads exactly what was just computed.
            return key_states, value_states
        row_index = torch.arange(current.num_rows, device=self.device).unsqueeze(1)
        keys[row_index, :, current.positions] = key_states.transpose(1, 2)
        values[row_index, :, current.positions] = value_states.transpose(1, 2)
        return keys[: current.num_rows, :, : current.read_length], values[: current.num_rows, :, : current.read_length]

    # The two queries HF's mask builder asks a cache. Only prefill passes leave the mask to HF (decode passes bring
    # their own 4D mask), and a prefilled row starts empty: pure causal attention, which HF runs as `is_causal`.
    def get_query_offset(self, layer_idx: int) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    def copy_prefix(self, source_row: int, destination_row: int, length: int) -> None:
        for layer_caches in (self.keys, self.values):
            for cache in layer_caches:
                cache[destination_row, :, :length] = cache[source_row, :, :length]

    def move_rows(self, sources: list[int], destinations: list[int]) -> None:
        if not sources:
            return
        source_index = torch.tensor(sources, device=self.device)
        destination_index = torch.tensor(destinations, device=self.device)
        for layer_caches in (self.keys, self.values):
            for cache in layer_caches:
                cache[destination_index] = cache[source_index]


def visible_positions(positions: torch.Tensor, read_length: int) -> torch.Tensor:
    """The attention mask [rows, 1, queries, read_length] of queries at `positions` ([rows, queries]): each sees
    its own row's positions up to its own, nothing after."""
    keys = torch.arange(read_length, device=positions.device)
    return (keys.view(1, 1, -1) <= positions.unsqueeze(2)).unsqueeze(1)


def run_decoder(
    decoder: torch.nn.Module,
    cache: SlotKVCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """One forward of a HF decoder stack over the slot cache (in the pass begun on it); the last hidden states."""
    output = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, cache=cache, use_cache=True)
    return output.last_hidden_state


def decode_pass(
    decoder: torch.nn.Module,
    cache: SlotKVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    read_length: int,
) -> torch.Tensor:
    """Feed the first rows `tokens` ([rows, queries]) at `positions`, attending to what each row has cached."""
    cache.ensure_capacity(read_length)
    cache.begin_decode(positions, read_length)
    return run_decoder(decoder, cache, tokens, positions, visible_positions(positions, read_length))
