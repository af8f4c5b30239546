"""A slot-per-row KV cache that HF attention layers write into through the `cache.update(...)` hook.

Running rows always occupy slots 0..B-1, so a decode step reads one contiguous prefix of the slot dimension and
never gathers rows; a leaving row's slot is filled by moving the last row into it (one small copy per layer).
Each row's tokens start at position 0 of its slot: no padding lives in the cache, the attention mask only hides
positions past each row's own length (and outside a sliding layer's window). Capacity along the token axis grows
by doubling, so a step never allocates.

It is a `transformers.Cache`, and answers the whole of that interface itself: what model code asks (mask sizes,
offsets, sequence length, layer kinds) from the pass in progress; what only `generate()` asks (beam reorders,
crops) raises, since the engine moves rows itself. Each layer's key and value shapes are learnt from the first
pass (MQA, GQA and MHA, keys and values of different widths as in DeepSeek's MLA), not guessed from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from genserve.scheduler.core.errors import UnsupportedModelError
from genserve.scheduler.kv.attention_masks import AttentionLayout


@dataclass
class PassPlan:
    """Where a forward pass (or a part of one) writes and what it reads: a prefill of rows [first_row,
    first_row+n), or queries at their own positions of rows first_row.. (decode)."""

    is_prefill: bool
    first_row: int
    num_rows: int
    num_queries: int
    offset: int = 0  # prefill: positions already in the slot (a cached prefix) that attention also reads
    positions: torch.Tensor | None = None  # decode: [rows, queries] write positions
    read_length: int = 0  # decode: how many positions attention reads
    # The paged cache's plan (paged_cache.py): where the pass writes in the flattened pool, and what it reads.
    writes: torch.Tensor | None = None
    reads: torch.Tensor | None = None  # the blocks it gathers, [rows, blocks] (None: nothing, or in place)
    view_rows: slice | None = None  # the rows whose homes it reads in place


class SlotKVCache(Cache):
    def __init__(
        self,
        layout: AttentionLayout,
        max_rows: int,
        max_context: int,
        dtype: torch.dtype,
        device: torch.device,
        initial_capacity: int = 256,
        spare_positions: int = 0,
    ) -> None:
        """`spare_positions` past `max_context` take the writes of speculative steps near the end of the context
        (their proposals are cut at the context, but the batched pass still writes them)."""
        super().__init__(layers=[])
        self.layout = layout
        self.num_layers = len(layout.layer_types)
        self.max_rows = max_rows
        self.max_positions = max_context + spare_positions
        self.dtype = dtype
        self.device = device
        self.capacity = min(initial_capacity, max_context)
        # Per layer, allocated by its first update: [max_rows, heads, capacity, head_dim].
        self.keys: list[torch.Tensor | None] = [None] * self.num_layers
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self._pass: PassPlan | None = None
        self.writes_in_attention = False  # see update()

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_rows: int, max_context: int, spare_positions: int) -> SlotKVCache:
        """A cache for this HF model's attention layers, in its dtype and on its device. A one-token pass through
        the model allocates every layer; a layer that never writes KV (state-space or recurrent layers, KV shared
        across layers) or a model that asks for state other than KV is refused here, at start-up."""
        parameter = next(model.parameters())
        cache = cls(
            AttentionLayout.for_model(model),
            max_rows,
            max_context,
            dtype=parameter.dtype,
            device=parameter.device,
            spare_positions=spare_positions,
        )
        name = type(model).__name__
        cache.begin_prefill(0, 1, num_queries=1)
        probe = torch.zeros(1, 1, dtype=torch.long, device=cache.device)
        try:
            with torch.no_grad():  # not inference_mode: the layers allocated here are written in later modes too
                run_model(model, cache, probe, probe, logits_to_keep=1)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{name}: {error}") from None
        except Exception as error:  # noqa: BLE001 - its code wants another cache: refuse now, not per request
            raise UnsupportedModelError(f"{name}: its forward does not run over the slot cache ({error})") from None
        missing = [layer for layer, keys in enumerate(cache.keys) if keys is None]
        if missing:
            raise UnsupportedModelError(
                f"{name}: layers {missing} keep no attention KV of their own (state-space or recurrent layers, or "
                "KV shared across layers); the engine serves decoders whose every layer is attention"
            )
        return cache

    @property
    def bytes_per_token(self) -> int:
        shapes = (shape for layer in range(self.num_layers) for shape in self.layer_shapes(layer))
        return sum(heads * head_dim for heads, head_dim in shapes) * self.dtype.itemsize

    def layer_shapes(self, layer: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, head_dim) of this layer's keys and of its values."""
        keys, values = self.keys[layer], self.values[layer]
        return (keys.shape[self.HEADS_AXIS], keys.shape[-1]), (values.shape[self.HEADS_AXIS], values.shape[-1])

    def ensure_capacity(self, num_positions: int) -> None:
        if num_positions <= self.capacity:
            return
        new_capacity = max(self.capacity, 1)
        while new_capacity < num_positions:
            new_capacity *= 2
        new_capacity = min(new_capacity, self.max_positions)
        for layer_caches in (self.keys, self.values):
            for layer, cache in enumerate(layer_caches):
                if cache is None:
                    continue
                grown = cache.new_zeros((*cache.shape[:2], new_capacity, cache.shape[3]))
                grown[:, :, : self.capacity] = cache
                layer_caches[layer] = grown
        self.capacity = new_capacity

    def begin_prefill(self, first_row: int, num_rows: int, num_queries: int, offset: int = 0) -> None:
        self._pass = PassPlan(True, first_row, num_rows, num_queries, offset=offset)

    def begin_decode(self, positions: torch.Tensor, read_length: int, first_row: int = 0) -> None:
        """A pass whose queries stand at `positions` ([rows, queries]) of rows first_row.. (decode steps, and
        prompt chunks that continue what their rows hold)."""
        self.begin(self.plan_decode(positions, read_length, first_row))

    def begin(self, plan: PassPlan) -> None:
        """Start a pass planned beforehand (plan_decode())."""
        self._pass = plan

    def plan_decode(self, positions: torch.Tensor, read_length: int, first_row: int = 0) -> PassPlan:
        """What begin_decode() begins, planned on its own: a compiled pass runs several such parts at once
        (compiled_step.py), each written and read through write_and_read(..., part)."""
        num_rows, num_queries = positions.shape
        return PassPlan(False, first_row, num_rows, num_queries, positions=positions, read_length=read_length)

    def _current(self) -> PassPlan:
        if self._pass is None:
            raise RuntimeError("the slot cache is used outside a pass started by begin_prefill() or begin_decode()")
        return self._pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The hook HF attention calls with this layer's new keys/values; returns what attention should read. In a
        compiled pass (`writes_in_attention`) the attention op writes and reads the cache itself
        (compiled_step.py), and the traced graph sees only this layer's new keys and values."""
        if self.writes_in_attention:
            return key_states, value_states
        return self.write_and_read(key_states, value_states, layer_idx)

    def write_and_read(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, part: PassPlan | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values where the pass (or this planned `part` of it) writes; return what
        attention reads."""
        current = part or self._current()
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states, value_states)
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
        rows = slice(current.first_row, current.first_row + current.num_rows)
        row_index = torch.arange(rows.start, rows.stop, device=self.device).unsqueeze(1)
        keys[row_index, :, current.positions] = key_states.transpose(1, 2)
        values[row_index, :, current.positions] = value_states.transpose(1, 2)
        return keys[rows, :, : current.read_length], values[rows, :, : current.read_length]

    def _allocate(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for layer_caches, states in ((self.keys, key_states), (self.values, value_states)):
            heads, head_dim = states.shape[1], states.shape[3]
            shape = (self.max_rows, heads, self.capacity, head_dim)
            layer_caches[layer] = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # What HF's mask builders and model code ask a cache. Decode passes and prefills after a cached prefix bring
    # their own masks (4D ones end HF's mask building early); the answers matter for plain prefills, where HF
    # builds the causal or sliding mask itself, and for models that take a 2D padding mask (whose queries are
    # then the last `num_queries` of `read_length` positions, each row's own length set by the padding).
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions already held before this pass's tokens (the longest row's, in a decode pass)."""
        current = self._current()
        return current.offset if current.is_prefill else current.read_length - current.num_queries

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_positions

    @property
    def batch_size(self) -> int:
        return self._current().num_rows

    @property
    def is_sliding(self) -> list[bool]:
        return self.layout.is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_initialized(self) -> bool:
        return all(keys is not None for keys in self.keys)

    HEADS_AXIS = 1  # of each layer's storage, [rows, heads, positions, head_dim]
    # Fixed-address tensors (CUDA graphs) are the engine's business; HF must not treat this as a static cache.
    is_compileable = False
    # Rows are cut and moved by the engine (release, move_rows), never by generate()'s cache surgery.
    is_croppable = False

    def __len__(self) -> int:
        return self.num_layers

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return False  # no recurrent state: models with one are refused at start-up

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0  # no recurrent state, and the past is never recorded (see is_recording_past)

    def activate_past_recording(self) -> None:
        raise _generate_only("activate_past_recording")

    def early_initialization(
        self,
        batch_size: int,
        num_heads: int | list[int],
        head_dim: int | list[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        raise _generate_only("early_initialization")

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Nothing to do: the slot cache stays on its device."""

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Nothing to do: the slot cache stays on its device."""

    def reset(self) -> None:
        for cache in (*self.keys, *self.values):
            if cache is not None:
                cache.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise _generate_only("crop")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _generate_only("reorder_cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise _generate_only("batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise _generate_only("batch_repeat_interleave")

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        raise _unsupported_state("convolution")

    def update_conv_state(
        self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: object
    ) -> torch.Tensor:
        raise _unsupported_state("convolution")

    def increase_count(self, layer_idx: int, state_idx: int) -> None:
        raise _unsupported_state("convolution")  # counts tokens written into a conv state in place

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        raise _unsupported_state("recurrent")

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs: object
    ) -> torch.Tensor:
        raise _unsupported_state("recurrent")

    def update_indexer(self, indexer_key_states: torch.Tensor, layer_idx: int) -> torch.Tensor:
        raise UnsupportedModelError("sparse-attention indexer keys (DeepSeek V3.2-style) are not cached by the engine")

    def read_row(self, layer: int, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `row`'s first `length` positions in `layer`, [heads, length, head_dim] each."""
        return self.keys[layer][row, :, :length], self.values[layer][row, :, :length]

    def write_row(self, layer: int, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys and values ([heads, n, head_dim]) at `row`'s positions start..start+n of `layer`."""
        end = start + keys.shape[1]
        self.keys[layer][row, :, start:end] = keys
        self.values[layer][row, :, start:end] = values

    def copy_prefix(self, source_row: int, destination_row: int, length: int) -> None:
        for layer in range(self.num_layers):
            self.write_row(layer, destination_row, 0, *self.read_row(layer, source_row, length))

    def move_rows(self, sources: list[int], destinations: list[int]) -> None:
        if not sources:
            return
        source_index = torch.tensor(sources, device=self.device)
        destination_index = torch.tensor(destinations, device=self.device)
        for layer_caches in (self.keys, self.values):
            for cache in layer_caches:
                cache[destination_index] = cache[source_index]


def _generate_only(method: str) -> NotImplementedError:
    return NotImplementedError(
        f"SlotKVCache.{method}: generate()'s cache handling; the engine adds, moves and frees rows itself"
    )


def _unsupported_state(kind: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"the model keeps {kind} state (state-space or hybrid layers), which is not served")


def run_model(
    model: torch.nn.Module,
    cache: SlotKVCache,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 0,
    mask: torch.Tensor | None = None,
    **attention_kwargs: torch.Tensor,
) -> torch.Tensor:
    """One forward of a HF causal LM over the slot cache, in the pass begun on it: logits of the last
    `logits_to_keep` positions (0: all), through the model's own head, so logit scales and soft-capping apply
    exactly as in `generate()`. A prefill of new rows leaves the mask to HF (causal, or sliding, as `generate()`
    builds it); `mask`, where given, stands in for the pass's own (a compiled pass's attention masks itself).
    `attention_kwargs` reach the attention function of every layer (HF hands a forward's extra keywords on)."""
    current = cache._current()
    fresh_rows = current.is_prefill and not current.offset
    read_length = current.offset + input_ids.shape[1] if current.is_prefill else current.read_length
    if mask is None and not fresh_rows:
        mask = cache.layout.masks(position_ids, read_length)
    output = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask,
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **attention_kwargs,
    )
    return output.logits


def prefill_pass(
    model: torch.nn.Module,
    cache: SlotKVCache,
    first_row: int,
    tokens: torch.Tensor,
    offset: int = 0,
    logits_to_keep: int | torch.Tensor = 1,
) -> torch.Tensor:
    """Write `tokens` ([rows, width]) into rows first_row.. after the `offset` positions each already holds
    (several rows come right-padded: the causal kernel hides each row's padding from its real tokens). The logits
    at `logits_to_keep` (the last n positions, or these positions), [rows, kept, vocab]."""
    rows, width = tokens.shape
    cache.ensure_capacity(offset + width + 1)
    cache.begin_prefill(first_row, rows, num_queries=width, offset=offset)
    positions = torch.arange(offset, offset + width, device=cache.device).expand(rows, width)
    return run_model(model, cache, tokens, positions, logits_to_keep=logits_to_keep)


def decode_pass(
    model: torch.nn.Module,
    cache: SlotKVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    read_length: int,
    first_row: int = 0,
    logits_to_keep: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Feed rows first_row.. `tokens` ([rows, queries]) at `positions`, attending to what each row has cached; the
    logits after each query, [rows, queries, vocab] (or at the query indices `logits_to_keep` picks, as in
    prefill_pass)."""
    cache.ensure_capacity(read_length)
    cache.begin_decode(positions, read_length, first_row)
    return run_model(model, cache, tokens, positions, logits_to_keep=logits_to_keep)
