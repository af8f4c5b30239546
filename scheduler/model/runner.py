"""The model runner: owns every tensor (KV cache, slot-indexed batch state) and executes the scheduler's plans.

A step decodes the running rows, computes the plan's prompt chunks, then processes the logits of every row that
gets a token together, picks the next tokens and decides stops on the device. Exactly one device-to-host copy
happens per step: each row's new tokens (one, or more when speculation was accepted), stop code and logprobs.

Slots are the runner's own business; callers name requests. Decoding rows hold slots 0..B-1 (the batch state's
rows, guidance companions included); requests still prefilling their prompt hold the slots after them, and
join the decoding rows when their last chunk is computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import PreTrainedModel

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.kv_blocks import BlockPool
from genserve.scheduler.core.params import MAX_SPECULATIVE
from genserve.scheduler.core.request import Sequence
from genserve.scheduler.core.snapshot import TokenCounters
from genserve.scheduler.core.step_plan import ModelOutput, PrefillChunk, StepPlan, StopCode
from genserve.scheduler.features.batch_state import BatchState
from genserve.scheduler.features.logits_feature import LogitsStep
from genserve.scheduler.features.logits_processing import process_logits
from genserve.scheduler.features.plugins import custom_stop_hits
from genserve.scheduler.features.sampling import select_tokens
from genserve.scheduler.features.speculation import Drafts
from genserve.scheduler.kv.paged_cache import PagedKVCache, pool_bytes
from genserve.scheduler.kv.slot_cache import SlotKVCache, decode_pass
from genserve.scheduler.model.compiled_step import CompiledDecoder, Rider
from genserve.scheduler.model.cpu_linear import with_linear_kernel
from genserve.scheduler.model.decode_graphs import StaticDecoder
from genserve.scheduler.model.draft_model import DraftModel
from genserve.scheduler.model.lora_layers import adapter_rows, install_lora_layers, lora_targets
from genserve.scheduler.model.lora_registry import AdapterRegistry
from genserve.scheduler.model.lora_slots import LoraSlots
from genserve.scheduler.model.prompt_passes import PromptPasses
from genserve.scheduler.model.speculative_step import propose, verify
from genserve.scheduler.model.step_results import advance_constraints, limit_tokens, logprob_columns, row_result


class ModelRunner(PromptPasses):
    def __init__(
        self,
        model: PreTrainedModel,
        config: EngineConfig,
        assistant_model: PreTrainedModel | None = None,
        adapters: AdapterRegistry | None = None,
    ) -> None:
        """`adapters`: the LoRA adapters requests may name (the engine's registry)."""
        self.config = config
        self.model = model = with_linear_kernel(model, config.linear_kernel, batch_hint=config.max_running)
        self.device = next(model.parameters()).device
        self.adapters = adapters
        self.lora: LoraSlots | None = None
        if config.serves_adapters:
            targets = lora_targets(model)
            install_lora_layers(model, targets)
            dtype = model.get_input_embeddings().weight.dtype
            self.lora = LoraSlots(targets, config.max_loras, config.max_lora_rank, dtype, self.device)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        max_rows, max_context = config.max_running, config.max_context
        # Paged: the pool whose blocks the scheduler hands out and this runner places (None: the slot cache).
        self.blocks: BlockPool | None = None
        if config.paged:
            memory = pool_bytes(config.kv_cache_memory, self.device)
            self.cache = PagedKVCache.for_model(model, max_rows, max_context, MAX_SPECULATIVE, memory)
            self.blocks = BlockPool(
                self.cache.num_blocks,
                self.cache.block_size,
                config.kv_admission_reserve,
                home_blocks=self.cache.home_blocks,
                caching=config.prefix_caching,
            )
        else:
            self.cache = SlotKVCache.for_model(model, max_rows, max_context, spare_positions=MAX_SPECULATIVE)
        # A model that takes only a 2D padding mask cannot place several queries of one row: no speculation.
        self.can_speculate = not self.cache.layout.padding_mask_only
        self.speculated_tokens = 0  # proposals verified since start
        self.accepted_tokens = 0  # of which the model agreed with
        self.state = BatchState(max_rows, self.vocab_size, min(self.cache.capacity, 256), self.device)
        self.prefilling: list[Sequence] = []  # slot = state.num_rows + index (companions included)
        self.draft = DraftModel(assistant_model, max_rows, max_context, MAX_SPECULATIVE) if assistant_model else None
        mode = config.decode_mode
        # A sharded step runs eagerly: its collectives stay out of captured graphs.
        auto_static = mode == "auto" and self.device.type == "cuda" and config.tensor_parallel_size == 1
        static = mode == "static" or auto_static
        self.static_decoder = StaticDecoder(model, self.cache, capture=True, lora=self.lora) if static else None
        self.compiled_decoder: CompiledDecoder | None = None
        if mode == "compiled":
            if self.device.type != "cpu":
                raise ValueError("the compiled decode step (--compile) is for CPU; on CUDA, decode replays CUDA graphs")
            self.compiled_decoder = CompiledDecoder(model, self.cache)
        if static and self.device.type == "cuda" and isinstance(self.cache, PagedKVCache):
            self.cache.always_gather = True  # a captured pass cannot choose between reading homes and gathering
        self.shared_generator = torch.Generator(device=self.device)
        self.shared_generator.manual_seed(config.seed)

    @property
    def rows(self) -> list[Sequence]:
        """The decoding requests, in slot order (guidance companions are internal)."""
        return self.state.request_rows

    @property
    def num_slots(self) -> int:
        """Slots in use, prefilling requests and guidance companions included."""
        return self.state.num_rows + len(self.prefilling)

    def num_tokens_held(self) -> int:
        """KV positions held: the decoding rows' tokens and what the prefilling ones have computed so far."""
        decoding = sum(seq.num_tokens for seq in list(self.state.rows))
        return decoding + sum(seq.num_computed_tokens for seq in list(self.prefilling))

    def counters(self) -> TokenCounters:
        blocks = self.blocks
        return TokenCounters(
            prefix_queried=blocks.queried_tokens if blocks is not None else 0,
            prefix_hits=blocks.hit_tokens if blocks is not None else 0,
            speculated=self.speculated_tokens,
            accepted=self.accepted_tokens,
        )

    def kv_usage_ratio(self) -> float:
        return self.num_tokens_held() / (self.config.max_running * self.config.max_context)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ModelOutput:
        """Free the plan's released requests, then decode its decoding rows, compute its prompt chunks and pick
        the next token of every row that gets one.

        A request whose own prefill raises fails alone (in the output's errors). Any other error frees the rows
        this step's chunks touched (the scheduler requeues or fails them), records no token, and propagates."""
        self.release(plan.released)
        if self.lora is not None:
            for name in self.adapters.take_unloaded():
                self.lora.evict(name)
        if self.blocks is not None:
            self.cache.copy_blocks_in_order(self.blocks.take_copies())  # cached KV moved out of homes
        self._hold_blocks(plan.kv_blocks)
        if not plan.has_work:
            return ModelOutput()
        try:
            return self._execute(plan)
        except BaseException:
            self.release(chunk.seq for chunk in plan.prefills)
            raise

    def _hold_blocks(self, grown: tuple[tuple[Sequence, int], ...]) -> None:
        """Rows whose blocks grew read their new tables (new requests when they get a slot)."""
        for member, _ in grown:
            slot = self._slot(member)
            if slot is not None:
                self._sync_row(slot, member)

    def _sync_row(self, slot: int, member: Sequence) -> None:
        """The cache reads `member`'s table in `slot` (its shared blocks copied home first, where the pool can)."""
        settled = self.blocks.settle_home(member)
        self.cache.copy_blocks_in_order(self.blocks.take_copies())  # cached KV out of the homes taken, first
        self.cache.copy_blocks(settled)
        self.cache.set_row(slot, self.blocks.table(member), self.blocks.is_home(member))

    def _place(self, moves: list[tuple[Sequence, int, int]]) -> None:
        """Paged: these holders take these slots, (holder, slot, positions written): the pool moves the blocks
        each holds alone into its new home where it can, and the cache copies their KV."""
        copies = self.blocks.place(moves)
        self.cache.copy_blocks_in_order(self.blocks.take_copies())  # cached KV out of the homes taken, first
        self.cache.copy_blocks(copies)
        for member, slot, _ in moves:
            self._sync_row(slot, member)

    def _move_rows(self, sources: list[int], destinations: list[int]) -> None:
        """Rows moved from `sources` to `destinations` (the slots already list them at their destinations)."""
        if self.blocks is None:
            self.cache.move_rows(sources, destinations)
            return
        self.cache.free_rows(set(sources) - set(destinations))
        holders = [self._holder(slot) for slot in destinations]
        self._place(
            [(seq, slot, self.blocks.held(seq) * self.blocks.block_size) for seq, slot in zip(holders, destinations)]
        )

    def _share(self, seq: Sequence, twin: Sequence, num_tokens: int) -> None:
        """`seq` has `twin`'s tokens, computed this step: it takes `twin`'s KV, sharing its full blocks (paged, while
        the pool is crowded) and copying the rest."""
        slot = self._slot(seq)
        if self.blocks is None:
            self.cache.copy_prefix(self._slot(twin), slot, num_tokens)
            return
        full = num_tokens // self.blocks.block_size
        copies = self.blocks.share(seq, twin, full)
        if num_tokens % self.blocks.block_size:
            copies.append((self.blocks.table(twin)[full], self.blocks.table(seq)[full]))
        self.cache.copy_blocks(copies)
        self._sync_row(slot, seq)

    def _execute(self, plan: StepPlan) -> ModelOutput:
        num_decoding = self.state.num_rows
        logits = []
        speculates = plan.speculate and self.can_speculate and num_decoding
        drafts = propose(self.state, self.draft, num_decoding) if speculates else None
        rode: dict[int, torch.Tensor | None] = {}  # see _decode
        if num_decoding:
            decode_logits, rode = self._decode(num_decoding, drafts, plan.prefills)
            logits.append(decode_logits[:, 0])
        elif plan.prefills and self.compiled_decoder is not None and self.compiled_decoder.ready:
            nothing = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # no row decodes: prompts alone
            compiled = self._decode_compiled(nothing, nothing, 0, plan.prefills)
            rode = compiled[1] if compiled is not None else {}
        errors: dict[str, str] = {}
        if plan.prefills:
            prefill_logits = self._prefill(plan.prefills, errors, rode)
            if prefill_logits is not None:
                logits.append(prefill_logits)
            self.state.refresh_composition()
        if not logits:
            return ModelOutput(errors=errors)
        scores = torch.cat(logits).float() if len(logits) > 1 else logits[0].float()
        slots = self.state.rows
        max_seq_length = max(seq.num_tokens for seq in slots)
        self.state.ensure_capacity(max_seq_length + 1 + (drafts.width if drafts is not None else 0))
        raw_scores = scores
        row_errors: dict[int, str] = {}
        scores = process_logits(scores, self.state, LogitsStep(max_seq_length, row_errors))
        next_tokens, final_scores = select_tokens(scores, self.state, self.shared_generator)
        if self.state.guidance is not None:  # the unconditional branch continues with its request's token
            guidance = self.state.guidance
            next_tokens = next_tokens.index_put((guidance.companion,), next_tokens[guidance.guided])
        # Every row emits its pick; a speculating row also the proposals the model agreed with, and the pick after.
        emitted, counts = next_tokens.unsqueeze(1), torch.ones_like(next_tokens)
        proposed = accepted = torch.zeros_like(next_tokens)
        if drafts is not None:
            emitted, counts, proposed, accepted = verify(self.state, drafts, decode_logits, next_tokens)
        counts, stops = limit_tokens(self.state, emitted, counts, self.config.max_context)
        self.state.record_tokens(emitted, counts)
        if self.state.uses_custom_criteria:
            hits = custom_stop_hits(scores, slots, self.state.history, row_errors)
            stops = torch.where(hits & (stops == int(StopCode.RUNNING)), int(StopCode.STOPPING_CRITERIA), stops)
        columns = [counts, stops, proposed, accepted, emitted]
        columns = [column.double().unsqueeze(1) if column.dim() == 1 else column.double() for column in columns]
        num_top = self.state.max_top_logprobs
        if num_top >= 0:
            wants_processed = self.state.processed_logprob_rows
            if wants_processed is not None:
                raw_scores = torch.where(wants_processed.unsqueeze(1), final_scores, raw_scores)
            columns += logprob_columns(raw_scores, next_tokens, num_top)
        # The one device-to-host copy of the step (token ids are exact in float64).
        host_rows = torch.cat(columns, dim=1).tolist()
        results = [row_result(seq, values, emitted.shape[1], num_top) for seq, values in zip(slots, host_rows)]
        self.speculated_tokens += sum(int(values[2]) for values in host_rows)
        self.accepted_tokens += sum(int(values[3]) for values in host_rows)
        if self.state.constrained_rows:
            results = advance_constraints(self.state, results, row_errors)
        errors.update((slots[slot].request_id, message) for slot, message in row_errors.items())
        by_request = {seq.request_id: result for seq, result in zip(slots, results) if not seq.is_companion}
        return ModelOutput(by_request, errors)

    def release(self, seqs: Iterable[Sequence]) -> None:
        """Free these requests' rows (and their guidance companions'), wherever they are; unknown ones are skipped.
        Their KV blocks are the scheduler's to free (a request whose padded group failed keeps them, and takes a
        row again this step)."""
        leaving = {id(member) for seq in seqs for member in (seq, seq.companion) if member is not None}
        if not leaving:
            return
        rows = {slot for slot, seq in enumerate(self.state.rows) if id(seq) in leaving}
        prefilling = {index for index, seq in enumerate(self.prefilling) if id(seq) in leaving}
        self._free(rows, prefilling)

    @torch.inference_mode()
    def _free(self, rows: set[int], prefilling: set[int]) -> None:
        """Free decoding rows (the last rows move into the holes, so they stay at 0..B-1) and prefilling entries
        (the others shift down behind the decoding rows, in order): one copy per layer for all the moves."""
        if not rows and not prefilling:
            return
        old_num_rows = self.state.num_rows
        sources, destinations = self.state.remove_rows(rows) if rows else ([], [])
        if self.draft is not None and rows:
            self.draft.move_rows(sources, destinations, self.state.num_rows)
        kept = [index for index in range(len(self.prefilling)) if index not in prefilling]
        for new, old in enumerate(kept):
            if old_num_rows + old != self.state.num_rows + new:
                sources.append(old_num_rows + old)
                destinations.append(self.state.num_rows + new)
        if self.blocks is not None:
            self.cache.free_rows(rows | {old_num_rows + index for index in prefilling})
        self.prefilling = [self.prefilling[index] for index in kept]
        self._move_rows(sources, destinations)
        if rows:
            self.state.refresh_composition()

    def _decode(
        self, num_rows: int, drafts: Drafts | None, chunks: tuple[PrefillChunk, ...]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor | None]]:
        """Logits [rows, 1 + proposals, vocab]: after each row's newest token, and after each of its proposals. A
        compiled pass also computes the prompt chunks that can ride in it; they are returned by id(request), with
        the logits after their last token where it completes the prompt (else None)."""
        state = self.state
        width = 1 + (drafts.width if drafts is not None else 0)
        read_length = max(seq.num_tokens for seq in self.state.rows[:num_rows]) + width - 1
        lengths = state.seq_length[:num_rows]
        # The newest token is in the history but not yet in the cache; proposals follow it.
        positions = (lengths - 1).unsqueeze(1) + torch.arange(width, device=self.device)
        tokens = state.history[torch.arange(num_rows, device=self.device), lengths - 1].unsqueeze(1)
        rows = self.state.rows[:num_rows]
        if drafts is None and self.static_decoder is not None:
            adapters = [seq.options.adapter for seq in rows] if self.lora is not None else None
            return self.static_decoder.logits(tokens, positions, read_length, adapters).unsqueeze(1), {}
        if drafts is None and self.compiled_decoder is not None and self.compiled_decoder.ready:
            compiled = self._decode_compiled(tokens, positions, read_length, chunks)
            if compiled is not None:
                return compiled
        if drafts is not None:
            tokens = torch.cat([tokens, drafts.tokens], dim=1)
        with self.adapters_of(rows):
            return decode_pass(self.model, self.cache, tokens, positions, read_length), {}

    def _decode_compiled(
        self, tokens: torch.Tensor, positions: torch.Tensor, read_length: int, chunks: tuple[PrefillChunk, ...]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor | None]] | None:
        """The compiled decode pass, with the plan's prompt chunks that can ride in it (None: run it eagerly; the
        riders then prefill as usual)."""
        boarding = self._board(chunks)
        if not boarding and not tokens.shape[0]:
            return None
        riders = [Rider(self._slot(chunk.seq), chunk.tokens, chunk.start, chunk.completes) for chunk in boarding]
        result = self.compiled_decoder.logits(tokens, positions, read_length, riders)
        if result is None:
            self.release(chunk.seq for chunk in boarding if chunk.first)  # they take their slots again
            return None
        decode_logits, rider_logits = result
        rode: dict[int, torch.Tensor | None] = {id(chunk.seq): None for chunk in boarding}
        completing = [chunk for chunk in boarding if chunk.completes]
        rode.update((id(chunk.seq), rider_logits[row : row + 1]) for row, chunk in enumerate(completing))
        return decode_logits, rode

    def adapters_of(self, rows: list[Sequence]) -> AbstractContextManager[None]:
        """Forward passes inside run each of these rows (the pass's, in order) with its LoRA adapter."""
        if self.lora is None:
            return nullcontext()
        return adapter_rows(self.lora.rows([seq.options.adapter for seq in rows]))

    def _add_prefilling(self, seq: Sequence) -> int:
        """A slot for `seq`, after the decoding rows and the requests already prefilling (and its LoRA adapter in
        an adapter slot)."""
        if self.lora is not None and seq.options.adapter:
            busy = {member.options.adapter for member in (*self.state.rows, *self.prefilling)}
            self.lora.activate(self.adapters[seq.options.adapter], busy)
        self.prefilling.append(seq)
        slot = self.state.num_rows + len(self.prefilling) - 1
        if self.blocks is not None:  # what it holds so far is its cached prefix
            self._place([(seq, slot, seq.num_computed_tokens)])
        return slot

    def _slot(self, seq: Sequence) -> int | None:
        """`seq`'s slot, or None when it holds none."""
        for slot, row in enumerate(self.state.rows):
            if row is seq:
                return slot
        for index, entry in enumerate(self.prefilling):
            if entry is seq:
                return self.state.num_rows + index
        return None

    def _holder(self, slot: int) -> Sequence:
        rows = self.state.rows
        return rows[slot] if slot < len(rows) else self.prefilling[slot - len(rows)]

    def _prefilling_index(self, seq: Sequence) -> int:
        return next(index for index, entry in enumerate(self.prefilling) if entry is seq)

    def _join(self, seq: Sequence) -> None:
        """`seq`'s prompt is computed: its slot becomes the next decoding row (swapped to the front of the
        prefilling slots first if another request, still prefilling, is ahead of it)."""
        index = self._prefilling_index(seq)
        first = self.state.num_rows
        if index:
            self.prefilling[0], self.prefilling[index] = self.prefilling[index], self.prefilling[0]
            self._move_rows([first, first + index], [first + index, first])
        self.prefilling.pop(0)
        self.state.add_row(seq)
        if self.draft is not None:
            self.draft.add_row()
