"""The compiled decode step (`genserve serve --compile`, EngineConfig.decode_mode "compiled"), for CPU.

Decode passes run the model's decoder through torch.compile (inductor's C++ backend), as vLLM's CPU worker does:
the norms, rotary embeddings, activations and residual adds between the GEMMs become fused loops, and the Python
of HF's modules, which a small model's decode step spends as much time in as in those ops, is gone. Two things
stay opaque to the compiler, called as they are from the compiled graph:
- the GEMMs (`genserve::onednn_linear`, cpu_linear.py), already the fastest kernels there are for them;
- attention with its KV cache (`genserve::cached_attention`), in passes with prompt chunks or rows that read
  borrowed blocks: the cache decides per pass which rows it reads in place and which it gathers; traced, those
  decisions would become guards that recompile the graph as rows come and go. Inside the op the pass writes and
  reads the cache and calls SDPA as transformers' SDPA attention does in an eager pass; for a decode query it
  makes that call itself (`one_query_attention`: the same call, bit for bit, without transformers' Python around
  it and with the boolean mask made additive once per pass, not per layer).
A decode pass of two rows or more whose rows all read their homes in place (the paged pool's usual case) has
nothing to decide, so the graph does it all (`_attend_in_graph`): the keys and values are written into the pool
by the fused kernel that computes them (an `index_copy_` traced in PagedKVCache.update), and SDPA is called from
the graph on the same views of the pool with the same additive mask as the op's, so the attention is the op's, bit
for bit, without its Python (at 16 rows about 8 ms of op calls, Python and KV-write calls a step, profiled).

Flat passes, as vLLM packs a step: every query of a pass stands in one sequence ([1, queries]), the decoding
rows' tokens first, then the prompt chunks that ride along (`Rider`: a new request's prompt after its cached
prefix, a fresh prompt, a long prompt's next chunk). A step that admits requests then reads the weights once, not
once for its decode pass and again for its prompts, and pads nothing. The op splits the queries into parts: the
decoding rows attend one query each; each rider writes its slot and attends to what its slot holds and to
itself, causally, with the mask the eager pass would give it.

Traced once, before serving: the decoder is compiled with dynamic shapes at start-up, on a one-query pass (torch
specializes a size of 1), a two-row decode pass attended in the graph and a two-query pass through the op (a
two-token prompt, which a one-row server has too), so the server's health turns SERVING only once it is ready
(SmolLM2 on 2 cores: about 180 s, or 80 s from inductor's cache on disk, TORCHINDUCTOR_CACHE_DIR). After that,
compilation never happens on a serving step: a pass that would compile again, or any failure, runs eagerly, and so
does every pass after it, with a log line saying so (its riders are then prefilled eagerly, as without the compiled
step). A step without decoding rows runs its prompts as a flat pass too. Prompts of requests with a guidance
companion, repeats of a prompt computed in the same step (they take its KV) and speculative passes stay eager.

Numerics: the fused loops reduce in another order than eager torch does (RMSNorm's mean of squares), so hidden
states differ from `generate()`'s in the last bits (about 1e-6 in fp32) and a greedy near-tie can flip. The GEMMs
and attention are the same calls as in eager mode; a riding prompt's rows go through GEMMs of another shape than
its eager prefill's (with the decoding rows), whose blocking may sum in another order too. The default, eager,
decode is the exact path (README).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from genserve.scheduler.kv.paged_cache import PagedKVCache, TracedDecode
from genserve.scheduler.kv.slot_cache import PassPlan, SlotKVCache, run_model
from genserve.scheduler.model.out_of_memory import is_out_of_memory

log = logging.getLogger(__name__)
ATTENTION_NAME = "genserve_compiled"  # the attention implementation compiled passes run, in HF's registry
DECODE_MASK = "genserve_decode_mask"  # the keyword that hands a pass attended in the graph its mask

_LIBRARY = torch.library.Library("genserve", "FRAGMENT")
_LIBRARY.define("cached_attention(Tensor query, Tensor key, Tensor value, int layer, float? scaling) -> Tensor")


@dataclass(frozen=True)
class Rider:
    """A prompt chunk that rides in a compiled decode pass: `tokens` of the request in `slot`, from position `start`
    on, after what its slot already holds (a cached prefix, or earlier chunks)."""

    slot: int
    tokens: list[int]
    start: int
    completes: bool  # its last token is the prompt's: the pass returns the logits after it


@dataclass
class _Part:
    """A part of a flat pass: `rows` rows of equally many queries each, at `queries` of the pass, written and read
    in the cache as `plan` says, masked by `masks` (one, or one per layer type)."""

    queries: slice
    rows: int
    plan: PassPlan
    masks: torch.Tensor | dict[str, torch.Tensor]


class _ActivePass(threading.local):
    """The compiled pass this thread runs (engines may share a process): its cache, attention modules and parts,
    and the decode part's mask as SDPA's CPU kernel takes it (`additive_mask_of_pass`)."""

    cache: SlotKVCache | None = None
    attention: list[torch.nn.Module] = []
    parts: list[_Part] = []
    mask: torch.Tensor | None = None
    additive_mask: torch.Tensor | None = None


_active = _ActivePass()


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 0 where attended and -inf where not: what SDPA's CPU kernel turns a boolean mask into on
    every call (the same attention, bit for bit)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def additive_mask_of_pass(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """additive_mask(), made once per pass rather than once per layer."""
    # A pass hands every layer the same mask; a model whose layer types alternate (sliding and full) has one
    # per type, and then each layer makes its own anew: correct, no cheaper.
    if mask is not _active.mask:
        _active.mask = mask
        _active.additive_mask = additive_mask(mask, dtype)
    return _active.additive_mask


def _cached_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scaling: float | None
) -> torch.Tensor:
    """Attention of a flat pass ([1, heads, queries, head_dim] each): every part writes its keys and values into
    its rows and attends over what its rows hold, with its own mask."""
    cache = _active.cache
    heads, value_dim = query.shape[1], value.shape[3]
    output = query.new_empty(query.shape[2], heads, value_dim)
    layer_type = cache.layout.layer_types[layer]
    for part in _active.parts:
        keys, values = cache.write_and_read(_by_row(key, part), _by_row(value, part), layer, part.plan)
        queries = _by_row(query, part)
        mask = part.masks if isinstance(part.masks, torch.Tensor) else part.masks[layer_type]
        if queries.shape[2] == 1 and mask.dtype == torch.bool and mask.shape[1] == 1:
            attended = one_query_attention(queries, keys, values, additive_mask_of_pass(mask, queries.dtype), scaling)
        else:
            attended = sdpa_attention_forward(_active.attention[layer], queries, keys, values, mask, scaling=scaling)[0]
        output[part.queries] = attended.reshape(-1, heads, value_dim)
    return output.unsqueeze(0)


def _by_row(states: torch.Tensor, part: _Part) -> torch.Tensor:
    """A part's share of a flat pass's states [1, heads, queries, head_dim], as [rows, heads, queries, head_dim]."""
    heads, head_dim = states.shape[1], states.shape[3]
    return states[0, :, part.queries].view(heads, part.rows, -1, head_dim).transpose(0, 1)


def one_query_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> torch.Tensor:
    """A decode pass's attention (one query per row, an additive mask shared by the heads: additive_mask()) as
    transformers' SDPA attention computes it, bit for bit, without its Python around the call: the query heads that
    share a key head packed into the query axis, SDPA, and the output as [rows, 1, heads, head_dim]."""
    rows, heads, _, head_dim = query.shape
    kv_heads = keys.shape[1]
    packed = query.reshape(rows, kv_heads, heads // kv_heads, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scaling)
    return output.reshape(rows, heads, 1, -1).transpose(1, 2).contiguous()


def _cached_attention_shape(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *others: object
) -> torch.Tensor:
    rows, heads, queries, _ = query.shape
    return query.new_empty((rows, queries, heads, value.shape[3]))  # HF attention's output layout


_LIBRARY.impl("cached_attention", _cached_attention, "CompositeExplicitAutograd")
_LIBRARY.impl("cached_attention", _cached_attention_shape, "Meta")


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """HF's attention-interface signature, for the compiled passes: the layer's new keys and values go to the op,
    which masks each part of the pass itself (`attention_mask` is the pass's placeholder). In a pass attended in
    the graph (`DECODE_MASK` given), `key` and `value` are what the rows hold (PagedKVCache.update wrote and read
    them), and this is the op's decode attention, traced: the same SDPA call on the same views of the pool."""
    decode_mask = kwargs.get(DECODE_MASK)
    if decode_mask is not None:
        rows = query.shape[2]  # the flat pass's queries, one per row
        return one_query_attention(query.transpose(0, 2), key, value, decode_mask, scaling).view(1, rows, -1), None
    output = torch.ops.genserve.cached_attention(query, key, value, module.layer_idx, scaling)
    return output, None


AttentionInterface.register(ATTENTION_NAME, _attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class CompiledDecoder:
    def __init__(self, model: torch.nn.Module, cache: SlotKVCache) -> None:
        """Compile `model`'s decoder and trace it on warm-up passes; on failure, `ready` stays False (logged)."""
        self.model = model
        self.cache = cache
        self.ready = False
        self.passes = 0  # decode passes served by the compiled graph
        self.riders = 0  # prompt chunks computed in them
        self.passes_in_graph = 0  # decode passes whose attention ran in the graph (_attend_in_graph)
        try:
            self._compile()
        except Exception as error:  # noqa: BLE001 - a model the compiler cannot take: serve it eagerly
            log.warning("--compile: compiling the decode step failed (%s); decoding eagerly", error)
            return
        self.ready = True
        log.info("--compile: decode step compiled (flat passes of 1 and 2+ queries, dynamic shapes)")

    def _compile(self) -> None:
        self.decoder = self.model.get_decoder()
        self.attention = _attention_modules(self.model)
        self.config = getattr(self.attention[0], "config", None)
        if self.config is None:  # transformers' attention interface reads the implementation from the config
            raise ValueError("the model's attention does not run through transformers' attention interface")
        if self.config._attn_implementation != "sdpa":
            raise ValueError(f"the model runs {self.config._attn_implementation} attention, the compiled step SDPA")
        if self.cache.layout.padding_mask_only:
            raise ValueError("the model takes a 2D padding mask (ALiBi), which the compiled step's attention cannot")
        # The pool never changes shape. Traced with dynamic sizes, its views drew guards that tied the read length
        # to the warm-up's, and every later pass would have compiled again.
        for pool in (*self.cache.keys, *self.cache.values):
            torch._dynamo.mark_static(pool)
        options = {"guard_filter_fn": _guards_to_keep}
        self.compiled = torch.compile(self.decoder.forward, dynamic=True, options=options, isolate_recompiles=True)
        # The graph's attention mask: a placeholder, which ends HF's mask building (the op masks each part itself).
        # It spans no key, so that a layer calling attention past the op fails the trace rather than attend wrongly.
        self.placeholder_mask = torch.ones(1, 1, 1, 0, dtype=torch.bool, device=self.cache.device)
        self.dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():  # as the engine's passes run: the graphs are traced for that mode
            # One query (torch specializes a size of 1); two rows attended in the graph, read to another length than
            # their count (equal sizes would share a symbol, and the graph would hold only where they are equal);
            # then two queries by the op, which traces the graph every longer pass with riders runs: a two-token
            # prompt in slot 0, so that a server of one row traces it too. Slots are free at start-up: what these
            # passes write lands where no request's KV lives yet.
            token = torch.zeros(1, 1, dtype=torch.long, device=self.cache.device)
            self._pass(token, torch.ones_like(token), 2, [])
            if self.cache.max_rows > 1:
                self._pass(token.expand(2, 1), torch.full((2, 1), 2, device=self.cache.device), 3, [])
            self._pass(token[:0], token[:0], 0, [Rider(slot=0, tokens=[0, 0], start=0, completes=True)])
        self.passes_in_graph = 0

    @torch.inference_mode()
    def logits(
        self, tokens: torch.Tensor, positions: torch.Tensor, read_length: int, riders: list[Rider]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Next-token logits [rows, 1, vocab] after each row's token at its position, and [riders that complete,
        vocab] after each of those riders' last token; None where this pass must run eagerly (compilation failed,
        or this pass would compile again)."""
        if not self.ready:
            return None
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                logits = self._pass(tokens, positions, read_length, riders)
            self.passes += 1
            self.riders += len(riders)
        except Exception as error:
            if is_out_of_memory(error):
                raise
            self.ready = False
            log.warning("--compile: a decode pass would compile again or failed (%s); decoding eagerly", error)
            return None
        rows = tokens.shape[0]
        return logits[:rows].unsqueeze(1), logits[rows:]

    def _pass(
        self, tokens: torch.Tensor, positions: torch.Tensor, read_length: int, riders: list[Rider]
    ) -> torch.Tensor:
        """One flat pass (every query in one sequence, [1, queries]): the decoding rows' tokens, then each rider's,
        with the compiled decoder standing in for the model's own (HF's causal-LM forward calls it, then its head
        as usual). The logits after each decoding row's token and each completing rider's last one."""
        cache, device = self.cache, self.cache.device
        cache.ensure_capacity(read_length)
        rows = tokens.shape[0]
        parts = []
        if rows:
            decode = cache.plan_decode(positions, read_length)
            parts.append(_Part(slice(0, rows), rows, decode, cache.layout.masks(positions, read_length)))
        flat_tokens, flat_positions, kept = [tokens.view(-1)], [positions.view(-1)], list(range(rows))
        first = rows
        for rider in riders:
            end = rider.start + len(rider.tokens)
            cache.ensure_capacity(end + 1)
            at = torch.arange(rider.start, end, device=device).unsqueeze(0)
            queries = slice(first, first + len(rider.tokens))
            parts.append(_Part(queries, 1, cache.plan_decode(at, end, rider.slot), cache.layout.masks(at, end)))
            flat_tokens.append(torch.tensor(rider.tokens, device=device))
            flat_positions.append(at[0])
            first = queries.stop
            if rider.completes:
                kept.append(first - 1)
        _active.cache, _active.attention, _active.parts = cache, self.attention, parts
        in_graph = rows > 1 and not riders and self._attend_in_graph(parts[0])
        attention = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION_NAME
        cache.writes_in_attention = True
        own_forward = self.decoder.__dict__.get("forward")  # one installed on the instance (a test's wrapper) stays
        self.decoder.forward = self.compiled
        try:
            cache.begin(parts[0].plan)  # what HF asks the cache (sizes, offsets) it answers for the first part
            logits = run_model(
                self.model,
                cache,
                torch.cat(flat_tokens).unsqueeze(0),
                torch.cat(flat_positions).unsqueeze(0),
                logits_to_keep=torch.tensor(kept, device=device) if riders else 0,
                mask=self.placeholder_mask,
                **{DECODE_MASK: cache.traced_decode.mask} if in_graph else {},
            )
            return logits[0]
        finally:
            if own_forward is None:
                del self.decoder.forward
            else:
                self.decoder.forward = own_forward
            cache.writes_in_attention = False
            if in_graph:
                cache.traced_decode = None
            self.config._attn_implementation = attention
            _active.cache = _active.mask = _active.additive_mask = None
            _active.parts = []

    def _attend_in_graph(self, decode: _Part) -> bool:
        """Whether the graph writes and attends this decode-only pass itself, as it can where every row reads its
        home in place under one boolean mask (paged cache); the cache is set for it. The pass has two rows or more:
        a row alone would need a graph of its own (torch specializes a size of 1), a fourth one to compile at
        start-up for the few passes where one row is left, so the op attends those."""
        cache, mask, plan = self.cache, decode.masks, decode.plan
        if not isinstance(cache, PagedKVCache) or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            return False
        if plan.view_rows is None or plan.view_rows.start != 0 or mask.shape[2] != 1:
            return False
        cache.traced_decode = TracedDecode(plan.writes, additive_mask(mask, self.dtype))
        self.passes_in_graph += 1
        return True


def _guards_to_keep(entries: list) -> list[bool]:
    """Dynamo's guards on the decoder's submodules, parameters and attributes are dropped: they never change while
    it serves (the compiled step serves no adapters and no shards), and checking them (6,200 of SmolLM2's 6,700)
    took 1.1 ms of a 16-row step. The guards on the pass's inputs stay: they choose among the one-query graph, the
    graph that attends in itself and the one that calls the op, and `fail_on_recompile` sends anything else to
    eager. Another model of the same class in the process still gets graphs of its own, since every compiled
    decoder's torch.compile call keeps its graphs apart (`isolate_recompiles`). Without that, calls with equal
    options share the graphs kept on the class's forward, and one traced on one model would run on another, reading
    its weights by the first one's layout (a test suite's models of one class found each other's graphs)."""
    return [not entry.orig_guard.source.is_unspecialized_nn_module() for entry in entries]


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules in layer order (HF's each carry their decoder layer's `layer_idx`)."""
    by_layer = {
        module.layer_idx: module
        for module in model.modules()
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)
    }
    if sorted(by_layer) != list(range(len(by_layer))) or not by_layer:
        raise ValueError("the model's attention modules do not number their layers 0..n-1")
    return [by_layer[index] for index in range(len(by_layer))]
