"""Linear layers with their weights prepacked for oneDNN: the CPU's fastest fp32 matmul for this engine's shapes.

`torch.nn.functional.linear` on CPU calls MKL's sgemm on the plain [out, in] weight, which handles the skinny
matrices of decode steps (a few rows against a wide weight) poorly: a 16-row step against SmolLM2's 49,152-token
head takes 2.4x longer than oneDNN on a weight reordered once into its blocked layout (what inductor's
`freezing` does). The engine runs the model through `prepacked_copy`: a copy of the module tree whose Linear
layers multiply with prepacked weights, sharing every other parameter with the caller's model, which stays as it
was (so `generate()` on it is the plain reference the parity tests compare against).

The packed weight is a second copy of each Linear's weight (the plain one stays in the caller's model).
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


class PrepackedLinear(torch.nn.Module):
    """`linear`'s computation with its weight reordered for oneDNN once. `weight` (the plain one, shared with the
    original layer) stays visible for code that reads shapes, such as `get_output_embeddings().weight`."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
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


def prepacked_copy(model: torch.nn.Module, batch_hint: int) -> torch.nn.Module:
    """A copy of `model`'s module tree (parameters and buffers shared, not copied) whose nn.Linear layers are
    PrepackedLinear."""
    clone = copy.copy(model)
    clone._modules = {
        name: _replacement(child, batch_hint) if child is not None else None for name, child in model._modules.items()
    }
    return clone


def _replacement(module: torch.nn.Module, batch_hint: int) -> torch.nn.Module:
    if type(module) is torch.nn.Linear:
        return PrepackedLinear(module, batch_hint)
    return prepacked_copy(module, batch_hint)
