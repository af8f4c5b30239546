"""Input embeddings read out of the output head's oneDNN-packed weight, where the head is tied to them.

A tied head multiplies with the embedding matrix itself. Packed once for oneDNN, that GEMM runs faster (SmolLM2's
49,152-token head at 16 rows: 14-16 ms packed against 19 ms on the plain matrix, alternating in one process), but
lookups need the rows of the plain matrix. vLLM keeps both copies; here the packed weight is the only one, and a
lookup gathers its rows from the packed memory. oneDNN's blocked layouts put element (row, column) at a row part
plus a column part of the buffer (blocks of rows, then columns, then the rows inside a block, padding after each);
both parts are learnt at load from two probes of the same shape, and the whole matrix read back through them must
equal the plain one bit for bit. Where it does not (another layout, another oneDNN), `pack_with_rows` says so and
the head multiplies with the plain matrix instead.
"""

from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)
_CHECK_ROWS = 4096  # the read-back check gathers this many rows at a time


def _memory_of(packed: torch.Tensor) -> torch.Tensor:
    """A packed fp32 weight's buffer as a flat tensor: an alias, valid while `packed` lives."""
    count = torch.ops.mkldnn._nbytes(packed) // 4
    return torch.frombuffer(
        (ctypes.c_float * count).from_address(torch.ops.mkldnn.data_ptr(packed)), dtype=torch.float32
    )


def _learn_offsets(shape: torch.Size, batch_hint: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where each row and each column of a [rows, columns] weight packed with `batch_hint` starts in the buffer:
    two probes hold each element's row + 1 and column + 1 (padding stays 0)."""
    num_rows, num_columns = shape

    def packed_indices(values: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(values.expand(num_rows, num_columns).contiguous(), batch_hint)

    rows = packed_indices(torch.arange(1, num_rows + 1, dtype=torch.float32).unsqueeze(1))
    columns = packed_indices(torch.arange(1, num_columns + 1, dtype=torch.float32))
    row_of, column_of = _memory_of(rows), _memory_of(columns)
    column_starts = torch.nonzero(column_of == 1).squeeze(1)  # where each row's first element lies
    row_starts = torch.nonzero(row_of == 1).squeeze(1)  # where row 0's elements lie
    if len(column_starts) != num_rows or len(row_starts) != num_columns:
        return None
    row_offsets = torch.empty(num_rows, dtype=torch.long)
    row_offsets[row_of[column_starts].long() - 1] = column_starts
    column_offsets = torch.empty(num_columns, dtype=torch.long)
    column_offsets[column_of[row_starts].long() - 1] = row_starts - row_offsets[0]
    return row_offsets, column_offsets


class PackedRows(torch.nn.Module):
    """An nn.Embedding's lookup, gathered from the packed weight of the head tied to it. `weight` keeps the
    matrix's shape and dtype for code that reads them, on the meta device (no memory)."""

    def __init__(
        self,
        embedding: torch.nn.Embedding,
        packed: torch.Tensor,
        row_offsets: torch.Tensor,
        column_offsets: torch.Tensor,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.register_buffer("weight", torch.empty_like(embedding.weight, device="meta"), persistent=False)
        self.packed = packed  # owns the memory `memory` aliases (the head holds the same tensor)
        self.memory = _memory_of(packed)
        self.register_buffer("row_offsets", row_offsets, persistent=False)
        self.register_buffer("column_offsets", column_offsets, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.memory[self.row_offsets[input_ids].unsqueeze(-1) + self.column_offsets]


def pack_with_rows(embedding: torch.nn.Embedding, packed: torch.Tensor, batch_hint: int) -> PackedRows | None:
    """A lookup for `embedding` that reads `packed` (its weight, packed for oneDNN with `batch_hint`), once every
    row read back through the learnt offsets equals the plain row; None (logged) where the layout is not one
    this reads."""
    weight = embedding.weight.detach()
    offsets = _learn_offsets(weight.shape, batch_hint)
    memory = _memory_of(packed)
    readable = offsets is not None and 0 <= int(offsets[0].min() + offsets[1].min())
    readable = readable and int(offsets[0].max() + offsets[1].max()) < memory.numel()
    if readable:
        row_offsets, column_offsets = offsets
        readable = all(
            torch.equal(memory[row_offsets[start : start + _CHECK_ROWS].unsqueeze(1) + column_offsets], rows)
            for start, rows in zip(range(0, len(weight), _CHECK_ROWS), weight.split(_CHECK_ROWS))
        )
    if not readable:
        log.info("the tied output head stays unpacked: its packed layout is not one the embedding lookup reads")
        return None
    return PackedRows(embedding, packed, row_offsets, column_offsets)
