"""Linear layers with their weights prepacked for oneDNN: the CPU's fastest fp32 matmul for this engine's shapes.

`torch.nn.functional.linear` on CPU calls MKL's sgemm on the plain [out, in] weight, which handles the skinny
matrices of decode steps (a few rows against a wide weight) poorly: a 16-row step against SmolLM2's 49,152-token
head takes 2.4x longer than oneDNN on a weight reordered once into its blocked layout (what inductor's
`freezing` does). The engine runs the model through `prepacked_copy`: a copy of the module tree whose Linear
layers multiply with prepacked weights, sharing every other parameter with the caller's model, which stays as it
was (so `generate()` on it is the plain reference the parity tests compare against).

Sibling projections that read the same input (q/k/v, gate/up: `SIBLING_PROJECTIONS`) multiply as one wider
prepacked GEMM (`FusedProjections`). The packed weights are a second copy of the Linear weights (the plain ones
stay in the caller's model).
"""

from __future__ import annotations

import copy

import torch


def onednn_applies(model: torch.nn.Module) -> bool:
    """oneDNN packing serves fp32 weights on a CPU whose torch build has it."""
    weight = next(model.parameters())
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def resolve_linear_kernel(kernel: str, model: torch.nn.Module) -> str:
    """ "auto" picks oneDNN wherever it applies (it measured faster at every batch size on CPU: README)."""
    if kernel == "onednn" and not onednn_applies(model):
        raise ValueError("linear_kernel 'onednn' needs fp32 weights on a CPU with oneDNN (mkldnn) support")
    if kernel == "auto":
        return "onednn" if onednn_applies(model) else "aten"
    return kernel


class _LinearStandIn(torch.nn.Module):
    """Stands where an nn.Linear stood: its plain weight (shared with the original layer) stays visible for code
    that reads shapes, such as `get_output_embeddings().weight`."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias


class PrepackedLinear(_LinearStandIn):
    """`linear`'s computation with its weight reordered for oneDNN once."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__(linear)
        # The hint tunes the blocking for that many rows; any row count computes correctly.
        self.register_buffer(
            "packed_weight",
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint),
            persistent=False,
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, self.packed_weight, self.bias, "none", [], "")


def with_linear_kernel(model: torch.nn.Module, kernel: str, batch_hint: int) -> torch.nn.Module:
    """`model` itself, or its prepacked copy where `kernel` resolves to oneDNN."""
    return prepacked_copy(model, batch_hint) if resolve_linear_kernel(kernel, model) == "onednn" else model


# Sibling projections that HF decoders call on the same input, one after the other: multiplied as one wider
# GEMM, they read the input once and keep oneDNN efficient on the narrow ones (GQA's k/v are 192 wide in
# SmolLM2): 4.2 ms less per 16-row step of its 30 layers, measured. vLLM fuses the same ones
# (QKVParallelLinear, MergedColumnParallelLinear).
SIBLING_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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
        self.input: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] = []
        self.unserved: set[int] = set()

    def output(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        if inputs is not self.input or index not in self.unserved:
            fused = torch.ops.mkldnn._linear_pointwise(inputs, self.packed_weight, self.bias, "none", [], "")
            self.input, self.outputs = inputs, list(fused.split(self.sizes, dim=-1))
            self.unserved = set(range(len(self.sizes)))
        self.unserved.discard(index)
        output = self.outputs[index]
        if not self.unserved:  # every sibling has its share: hold no activations between calls
            self.input, self.outputs = None, []
        return output


class FusedProjection(_LinearStandIn):
    """One sibling of a FusedProjections group."""

    def __init__(self, linear: torch.nn.Linear, group: FusedProjections, index: int) -> None:
        super().__init__(linear)
        self.group, self.index = group, index

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.index, inputs)


def prepacked_copy(model: torch.nn.Module, batch_hint: int) -> torch.nn.Module:
    """A copy of `model`'s module tree (parameters and buffers shared, not copied) whose nn.Linear layers are
    PrepackedLinear, or FusedProjection where siblings of SIBLING_PROJECTIONS share an input."""
    children = model._modules
    fused: dict[str, torch.nn.Module] = {}
    for names in SIBLING_PROJECTIONS:
        linears = [children.get(name) for name in names]
        siblings = all(type(linear) is torch.nn.Linear for linear in linears)
        if siblings and len({linear.in_features for linear in linears}) == 1:
            group = FusedProjections(linears, batch_hint)
            fused.update(
                (name, FusedProjection(linear, group, index))
                for index, (name, linear) in enumerate(zip(names, linears))
            )
    clone = copy.copy(model)
    clone._modules = {
        name: fused[name] if name in fused else _replacement(child, batch_hint) for name, child in children.items()
    }
    return clone


def _replacement(module: torch.nn.Module | None, batch_hint: int) -> torch.nn.Module | None:
    if module is None:  # a child slot the model registered empty
        return None
    if type(module) is torch.nn.Linear:
        return PrepackedLinear(module, batch_hint)
    return prepacked_copy(module, batch_hint)
