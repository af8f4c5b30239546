"""ModelRunner's prompt passes: the plan's prompt chunks computed into their requests' slots. Whole fresh prompts of
similar lengths run together right-padded; so do new requests' prompts that continue a cached prefix, each at its
own positions; other chunks run one by one after what their slot holds (earlier chunks), or take a twin's KV,
prefilled this step. A mixin of ModelRunner: it works on the runner's cache, batch state and slots."""

from __future__ import annotations

import torch

from genserve.scheduler.core.request import Sequence
from genserve.scheduler.core.step_plan import PrefillChunk
from genserve.scheduler.kv.slot_cache import decode_pass, prefill_pass
from genserve.scheduler.model.out_of_memory import is_out_of_memory


class PromptPasses:
    def _board(self, chunks: tuple[PrefillChunk, ...]) -> list[PrefillChunk]:
        """The plan's prompt chunks that ride in this step's compiled decode pass (compiled_step.py): all but those
        of requests with a guidance companion and repeats of a prompt another chunk computes this step (which take
        its KV in _prefill). New requests among them take their slots now."""
        boarding: list[PrefillChunk] = []
        prompts: set[TwinKey] = set()
        for chunk in chunks:
            key = _twin_key(chunk.seq)
            if chunk.seq.companion is not None or (chunk.first and key in prompts):
                continue
            if chunk.first:
                prompts.add(key)
                self._add_prefilling(chunk.seq)
            boarding.append(chunk)
        return boarding

    def _prefill(
        self, chunks: tuple[PrefillChunk, ...], errors: dict[str, str], rode: dict[int, torch.Tensor | None]
    ) -> torch.Tensor | None:
        """Compute the plan's prompt chunks, but those that rode in the decode pass (`rode`: by id(request), the
        logits after the last token of those that completed). Requests whose prompt is now complete join the
        decoding rows, in plan order; returns the logits after each one's last token, in that order.

        Whole fresh prompts of similar lengths run together, right-padded in one forward with the plain causal
        kernel: a padded position comes after every real one, so causality hides it, and each real token runs
        the computation `generate()` runs for it alone (tests compare the tokens). New requests that continue a
        cached prefix run together too, each row's queries at its own positions with its own mask
        (`_continue_together`). Later chunks of longer prompts, requests that repeat a prompt of this step (n
        samples: its KV shared) or bring a guidance companion go one by one, each after the positions its slot
        already holds. A failure is attributable: a failed group is retried one by one, and a request whose own
        prefill raises fails alone (out of memory excepted, which the engine handles for the whole batch)."""
        # id(request or companion) -> logits after its last token
        last_logits = {seq: logits for seq, logits in rode.items() if logits is not None}
        prefilled: dict[TwinKey, tuple[Sequence, torch.Tensor]] = {}
        rode_prompts: set[TwinKey] = set()  # a repeat of one of these takes its KV
        for chunk in chunks:
            if id(chunk.seq) in rode and chunk.first:
                rode_prompts.add(_twin_key(chunk.seq))
                if chunk.completes:
                    prefilled[_twin_key(chunk.seq)] = (chunk.seq, last_logits[id(chunk.seq)])
        whole: dict[TwinKey, PrefillChunk] = {}
        one_by_one: list[PrefillChunk] = []
        for chunk in chunks:
            if id(chunk.seq) in rode:
                continue
            key = _twin_key(chunk.seq)
            alone = chunk.seq.companion is not None or key in whole or key in rode_prompts
            if chunk.first and chunk.start == 0 and chunk.completes and not alone:
                whole[key] = chunk
            else:
                one_by_one.append(chunk)
        continuing: dict[TwinKey, PrefillChunk] = {}
        if not self.cache.layout.padding_mask_only:  # a 2D mask cannot place each row's queries
            for chunk in one_by_one:
                key = _twin_key(chunk.seq)
                if (
                    chunk.first
                    and chunk.start
                    and chunk.seq.companion is None
                    and key not in whole
                    and key not in rode_prompts
                ):
                    continuing.setdefault(key, chunk)  # a repeat stays one by one, to take its twin's KV
        one_by_one = [chunk for chunk in one_by_one if chunk not in continuing.values()]
        for groups, together in (
            (_padding_groups(list(whole.values())), self._prefill_together),
            (_padding_groups(list(continuing.values())), self._continue_together),
        ):
            for group in groups:
                if len(group) == 1:
                    one_by_one.insert(0, group[0])
                    continue
                try:
                    last_logits.update(together(group, prefilled))
                except Exception as error:
                    if is_out_of_memory(error):
                        raise
                    self.release(chunk.seq for chunk in group)
                    one_by_one[:0] = group  # retried alone, so that only the request at fault fails
        for chunk in one_by_one:
            try:
                last_logits.update(self._prefill_chunk(chunk, prefilled))
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                self.release([chunk.seq])
                errors[chunk.seq.request_id] = f"{type(error).__name__}: {error}"
        joined = []
        for chunk in chunks:
            if chunk.completes and chunk.seq.request_id not in errors:
                for member in (chunk.seq, chunk.seq.companion):
                    if member is not None:
                        self._join(member)
                        joined.append(last_logits[id(member)])
        return torch.cat(joined) if joined else None

    def _prefill_together(
        self, group: list[PrefillChunk], prefilled: dict[TwinKey, tuple[Sequence, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Give each request of `group` a slot (consecutive) and prefill their whole prompts in one right-padded
        forward."""
        prompts = [chunk.seq.prompt_ids + chunk.seq.generated_ids for chunk in group]
        lengths = [len(tokens) for tokens in prompts]
        width = max(lengths)
        slots = [self._add_prefilling(chunk.seq) for chunk in group]
        padded = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for row, tokens in enumerate(prompts):
            padded[row, : len(tokens)] = torch.tensor(tokens, device=self.device)
        last = sorted({length - 1 for length in lengths})  # the positions whose logits anyone needs
        keep = torch.tensor(last, device=self.device)
        with self.adapters_of([chunk.seq for chunk in group]):
            logits = prefill_pass(self.model, self.cache, slots[0], padded, logits_to_keep=keep)
        result = {}
        for row, (chunk, tokens) in enumerate(zip(group, prompts)):
            result[id(chunk.seq)] = logits[row : row + 1, last.index(len(tokens) - 1)]
            prefilled[_twin_key(chunk.seq)] = (chunk.seq, result[id(chunk.seq)])
        return result

    def _continue_together(
        self, group: list[PrefillChunk], prefilled: dict[TwinKey, tuple[Sequence, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Give each new request of `group` a slot (consecutive) and compute its chunk after the cached prefix its
        slot holds, all in one forward whose rows stand at their own positions. Rows are left-padded, so that every
        row's last token is the pass's last query (the head runs once per row); a row's padding queries stand at
        the position after its chunk, which its next token or chunk writes before anything reads it, so they never
        overwrite its KV, and its mask (by position) hides them from its real queries."""
        slots = [self._add_prefilling(chunk.seq) for chunk in group]
        width = max(chunk.num_tokens for chunk in group)
        tokens = torch.zeros(len(group), width, dtype=torch.long)
        positions = torch.tensor([[chunk.end] * width for chunk in group])
        for row, chunk in enumerate(group):
            padding = width - chunk.num_tokens
            tokens[row, padding:] = torch.tensor(chunk.tokens)
            positions[row, padding:] = torch.arange(chunk.start, chunk.end)
            self.cache.ensure_capacity(chunk.seq.num_tokens + 1)
        with self.adapters_of([chunk.seq for chunk in group]):
            logits = decode_pass(
                self.model,
                self.cache,
                tokens.to(self.device),
                positions.to(self.device),
                max(chunk.end for chunk in group) + 1,
                first_row=slots[0],
                logits_to_keep=1,
            )
        result = {}
        for row, chunk in enumerate(group):
            if chunk.completes:
                result[id(chunk.seq)] = logits[row : row + 1, 0]
                prefilled[_twin_key(chunk.seq)] = (chunk.seq, result[id(chunk.seq)])
        return result

    def _prefill_chunk(
        self, chunk: PrefillChunk, prefilled: dict[TwinKey, tuple[Sequence, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Compute one chunk in its request's slot (a first chunk takes a slot, and one for a guidance companion,
        whose prompt is prefilled whole with its request's last chunk). The logits after the last token of each
        member that completed."""
        seq = chunk.seq
        if chunk.first:
            for member in (seq, seq.companion):
                if member is not None:
                    self._add_prefilling(member)
        logits = {}
        computed = self._compute(seq, chunk.start, chunk.end, prefilled, chunk.first)
        if computed is not None:
            logits[id(seq)] = computed
        companion = seq.companion
        if chunk.completes and companion is not None:
            logits[id(companion)] = self._compute(companion, companion.num_computed_tokens, None, prefilled, True)
        return logits

    def _compute(
        self,
        seq: Sequence,
        start: int,
        end: int | None,
        prefilled: dict[TwinKey, tuple[Sequence, torch.Tensor]],
        first: bool,
    ) -> torch.Tensor | None:
        """Fill positions [start, end) of `seq`'s slot (end None: to its last token) from a twin prefilled this
        step (a `first` chunk of a whole prompt), or a forward after what the slot holds. The logits after its last
        token when the slot now holds all of it."""
        tokens = seq.prompt_ids + seq.generated_ids
        end = len(tokens) if end is None else end
        self.cache.ensure_capacity(len(tokens) + 1)  # before a twin's KV is copied in
        twin = prefilled.get(_twin_key(seq)) if first and end == len(tokens) else None
        if twin is not None:
            self._share(seq, twin[0], len(tokens))
            return twin[1]
        input_ids = torch.tensor([tokens[start:end]], device=self.device)
        with self.adapters_of([seq]):
            logits = prefill_pass(self.model, self.cache, self._slot(seq), input_ids, offset=start)[:, -1]
        if end < len(tokens):
            return None
        prefilled[_twin_key(seq)] = (seq, logits)
        return logits


# What makes two requests' prompt KV the same: their LoRA adapter and their tokens.
TwinKey = tuple[str, tuple[int, ...]]


def _twin_key(seq: Sequence) -> TwinKey:
    return seq.options.adapter, tuple(seq.prompt_ids + seq.generated_ids)


def _padding_groups(
    chunks: list[PrefillChunk], max_padding: float = 0.25, pass_tokens: int = 32
) -> list[list[PrefillChunk]]:
    """Chunks sorted by length and cut into groups whose padding stays under `max_padding` of their tokens plus
    `pass_tokens`: what a forward of its own would cost in tokens (on CPU a short prompt's pass costs about as
    much as 25 more of its tokens)."""
    groups: list[list[PrefillChunk]] = []
    for chunk in sorted(chunks, key=lambda c: c.num_tokens):
        group = groups[-1] if groups else None
        if (
            group
            and chunk.num_tokens * (len(group) + 1)
            <= (1 + max_padding) * (sum(c.num_tokens for c in group) + chunk.num_tokens) + pass_tokens
        ):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups
