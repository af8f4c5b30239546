"""Linear layers with their weights prepacked for oneDNN: the CPU's fastest fp32 matmul for this engine's shapes.

`torch.nn.functional.linear` on CPU calls MKL's sgemm on the plain [out, in] weight, which handles the skinny
matrices of decode steps (a few rows against a wide weight) poorly: a 16-row step against SmolLM2's 49,152-token
head takes 2.4x longer than oneDNN on a weight reordered once into its blocked layout (what inductor's
`freezing` does). The engine packs the model it is given in place (`prepack_in_place`): each nn.Linear becomes a
layer that multiplies with its prepacked weight, and the plain weight is let go, so that the serving process holds
one copy of the Linear weights (an output head tied to the input embeddings is packed too, and the lookups read
their rows from the packed weight: packed_embeddings.py; where they cannot, the head multiplies with the
embeddings as they are: `SharedWeightLinear`). `generate()` still works on the packed model; a plain reference for
comparing against is a second load of the model (the tests keep one).

Sibling projections that read the same input (q/k/v, gate/up: `SIBLING_PROJECTIONS`) multiply as one wider
prepacked GEMM (`FusedProjections`).

Inside a graph that torch.compile traces (the compiled decode step, compiled_step.py), each GEMM is the opaque op
`genserve::onednn_linear`: inductor's own lowering of oneDNN's linear takes only weights it froze itself, and the
GEMM is already the fastest kernel there is for it; inductor fuses what lies between the GEMMs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from genserve.scheduler.model.packed_embeddings import pack_with_rows

# The GEMM as one op that compiled graphs call as it is (a Library op: less dispatch overhead per call than
# torch.library.custom_op's, which a 16-row decode step pays 121 times).
_LIBRARY = torch.library.Library("genserve", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor inputs, Tensor weight, Tensor? bias) -> Tensor")


def onednn_applies(model: torch.nn.Module) -> bool:
    """oneDNN packing serves fp32 weights on a CPU whose torch build has it, in a model that is not sharded (a
    tensor-parallel shard keeps its DTensor weights: the plan's hooks gather and reduce around them)."""
    weight = next(model.parameters())
    plain = weight.device.type == "cpu" and weight.dtype == torch.float32 and not isinstance(weight, DTensor)
    return plain and torch.backends.mkldnn.is_available()


def resolve_linear_kernel(kernel: str, model: torch.nn.Module) -> str:
    """ "auto" picks oneDNN wherever it applies (it measured faster at every batch size on CPU: README)."""
    if kernel == "onednn" and not onednn_applies(model):
        raise ValueError("linear_kernel 'onednn' needs fp32 weights on a CPU with oneDNN (mkldnn) support")
    if kernel == "auto":
        return "onednn" if onednn_applies(model) else "aten"
    return kernel


def _onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


def _onednn_linear_shape(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return inputs.new_empty((*inputs.shape[:-1], weight.shape[0]))  # packed weights keep their [out, in] shape


_LIBRARY.impl("onednn_linear", _onednn_linear, "CompositeExplicitAutograd")  # packed weights are MkldnnCPU
_LIBRARY.impl("onednn_linear", _onednn_linear_shape, "Meta")


def onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`inputs @ weight.T + bias` by oneDNN, on a weight packed for it or a plain [out, in] one; no fused
    activation."""
    if torch.compiler.is_compiling():
        return torch.ops.genserve.onednn_linear(inputs, weight, bias)
    return _onednn_linear(inputs, weight, bias)


class _LinearStandIn(torch.nn.Module):
    """Stands where an nn.Linear stood. Code that reads the weight's shape or dtype (such as
    `get_output_embeddings().weight`) still can: `weight` is the plain weight where another module owns it too (an
    output head tied to the embeddings), else a tensor on the meta device, of the same shape and dtype, that holds
    no memory."""

    def __init__(self, linear: torch.nn.Linear, shared_weights: set[int]) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if id(linear.weight) in shared_weights:
            self.weight = linear.weight
        else:
            self.register_buffer("weight", torch.empty_like(linear.weight, device="meta"), persistent=False)
        self.bias = linear.bias


class PrepackedLinear(_LinearStandIn):
    """`linear`'s computation with its weight reordered for oneDNN once."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int, shared_weights: set[int]) -> None:
        super().__init__(linear, shared_weights)
        # The hint tunes the blocking for that many rows; any row count computes correctly.
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint),
            persistent=False,
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return onednn_linear(inputs, self.packed_weight, self.bias)


class SharedWeightLinear(_LinearStandIn):
    """A Linear layer whose weight another module owns too, where that module cannot read a packed weight
    (packed_embeddings.py reads a plain nn.Embedding's rows from one): oneDNN multiplies with that weight as it
    is. A packed copy would hold the weights twice (108 MiB for SmolLM2's head) to run faster (SmolLM2's head,
    packed against plain, alternating in one process: 6.9 against 7.5 ms at 1 row, 17.7 against 24.9 at 16, 53
    against 58.5 at 64; equal bits at 16 and 64 rows)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return onednn_linear(inputs, self.weight.detach(), self.bias)


def with_linear_kernel(model: torch.nn.Module, kernel: str, batch_hint: int) -> torch.nn.Module:
    """`model`, packed in place where `kernel` resolves to oneDNN (a model packed already stays as it is)."""
    if is_prepacked(model):
        if kernel == "aten":
            raise ValueError("linear_kernel 'aten': this model's Linear layers are packed for oneDNN; load it again")
        return model
    if resolve_linear_kernel(kernel, model) == "onednn":
        prepack_in_place(model, batch_hint)
    return model


def is_prepacked(model: torch.nn.Module) -> bool:
    return any(isinstance(module, _LinearStandIn) for module in model.modules())


# Sibling projections that HF decoders call on the same input, one after the other: multiplied as one wider
# GEMM, they read the input once and keep oneDNN efficient on the narrow ones (GQA's k/v are 192 wide in
# SmolLM2): 4.2 ms less per 16-row step of its 30 layers, measured. vLLM fuses the same ones
# (QKVParallelLinear, MergedColumnParallelLinear).
SIBLING_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class _Shares:
    """A fused GEMM's outputs that siblings have yet to take."""

    input: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)
    unserved: set[int] = field(default_factory=set)


class _PendingShares(threading.local):
    """The shares per thread: engines that share one model run their passes in threads of their own."""

    def __init__(self) -> None:
        self.shares = _Shares()


class FusedProjections:
    """The GEMM of several sibling Linear layers: the first of them called on an input computes every sibling's
    output; the others return their share while called on that same tensor (any other input is computed anew,
    so a caller that feeds them different inputs still gets the right outputs)."""

    def __init__(self, linears: list[torch.nn.Linear], batch_hint: int) -> None:
        weight = torch.cat([linear.weight.detach() for linear in linears])
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        biases = [linear.bias for linear in linears]
        self.bias = None
        if any(bias is not None for bias in biases):
            self.bias = torch.cat(
                [
                    bias.detach() if bias is not None else weight.new_zeros(linear.out_features)
                    for bias, linear in zip(biases, linears)
                ]
            )
        self.sizes = [linear.out_features for linear in linears]
        self.pending = _PendingShares()
        # The same bookkeeping while torch.compile traces a pass (it follows a plain object, not a thread-local):
        # the traced graph computes the GEMM once and hands out its shares.
        self.traced = _Shares()

    def output(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        pending = self.traced if torch.compiler.is_compiling() else self.pending.shares
        if inputs is not pending.input or index not in pending.unserved:
            fused = onednn_linear(inputs, self.packed_weight, self.bias)
            pending.input, pending.outputs = inputs, list(fused.split(self.sizes, dim=-1))
            pending.unserved = set(range(len(self.sizes)))
        pending.unserved.discard(index)
        output = pending.outputs[index]
        if not pending.unserved:  # every sibling has its share: hold no activations between calls
            pending.input, pending.outputs = None, []
        return output


class FusedProjection(_LinearStandIn):
    """One sibling of a FusedProjections group."""

    def __init__(self, linear: torch.nn.Linear, group: FusedProjections, index: int, shared_weights: set[int]) -> None:
        super().__init__(linear, shared_weights)
        self.group, self.index = group, index
        if index == 0:  # the group's GEMM weight, registered once, so that the model's buffers count it
            self.register_buffer("packed_weight", group.packed_weight, persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, inputs)


def _pack_tied_head(model: torch.nn.Module, batch_hint: int) -> None:
    """An output head tied to plain nn.Embedding input embeddings: packed, and the lookups read the packed copy
    (packed_embeddings.py), so that the head's GEMM runs packed without a second copy of the matrix."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    plain = type(head) is torch.nn.Linear and type(embedding) is torch.nn.Embedding and embedding.max_norm is None
    if not plain or head.weight is not embedding.weight:
        return
    packed_head = PrepackedLinear(head, batch_hint, shared_weights=set())
    lookup = pack_with_rows(embedding, packed_head.packed_weight, batch_hint)
    if lookup is None:
        return
    replacements = {id(head): packed_head, id(embedding): lookup}
    for module in list(model.modules()):
        module._modules.update(
            (name, replacements[id(child)]) for name, child in module._modules.items() if id(child) in replacements
        )


def prepack_in_place(model: torch.nn.Module, batch_hint: int) -> None:
    """Replace `model`'s nn.Linear layers with PrepackedLinear, or FusedProjection where siblings of
    SIBLING_PROJECTIONS share an input; their plain weights are let go unless another module holds them too (an
    output head tied to the input embeddings is packed where the lookups can read it packed: _pack_tied_head)."""
    _pack_tied_head(model, batch_hint)
    shared_weights = {
        id(parameter)
        for module in model.modules()
        if type(module) is not torch.nn.Linear
        for parameter in module.parameters(recurse=False)
    }
    for module in list(model.modules()):
        children = module._modules
        replacements: dict[str, torch.nn.Module] = {}
        for names in SIBLING_PROJECTIONS:
            linears = [children.get(name) for name in names]
            siblings = all(type(linear) is torch.nn.Linear for linear in linears)
            if siblings and len({linear.in_features for linear in linears}) == 1:
                group = FusedProjections(linears, batch_hint)
                replacements.update(
                    (name, FusedProjection(linear, group, index, shared_weights))
                    for index, (name, linear) in enumerate(zip(names, linears))
                )
        for name, child in children.items():
            if name not in replacements and type(child) is torch.nn.Linear:
                if id(child.weight) in shared_weights:
                    replacements[name] = SharedWeightLinear(child, shared_weights)
                else:
                    replacements[name] = PrepackedLinear(child, batch_hint, shared_weights)
        children.update(replacements)
    # Weights loaded from safetensors are views of one memory-mapped file: a parameter that stays (embeddings,
    # norms) would keep the whole mapping, and every page that packing read, resident. Copies of their own let
    # the file go.
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
