"""`genserve bench --decode-latency`: one genserve decode step at several batch sizes, against the memory-bandwidth
floor of this device.

A decode step must read every weight once and each row's KV cache; for a small model that traffic, not the
arithmetic, sets the pace. The floor is those bytes divided by the device's measured copy bandwidth (a large
tensor copy, read plus write): no implementation of the step can beat it on this hardware. The step measured is
the engine's whole `step()`: scheduling, the batched forward, processing, sampling and the one host copy.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.request import RequestOptions
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.kv.slot_cache import SlotKVCache
from genserve.scheduler.model.loader import LoadedModel


@dataclass(frozen=True)
class DecodeLatency:
    batch_size: int
    context: int
    seconds: float  # median engine step, decode only
    floor_seconds: float  # bytes the step must read / measured bandwidth

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor_seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second a large device-to-device copy moves (each byte counted once read, once written)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    destination = torch.empty_like(source)
    destination.copy_(source)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        destination.copy_(source)
    _synchronize(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - started)


def weight_bytes(model: torch.nn.Module) -> int:
    """The bytes of the weights a step reads: parameters, and the buffers that hold packed Linear weights once an
    engine has packed the model (their plain stand-ins are on the meta device and hold nothing)."""
    tensors = [*model.parameters(), *(buffer for buffer in model.buffers() if not buffer.is_meta)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def decoding_engine(
    loaded: LoadedModel, batch_size: int, context: int, steps: int, **engine_options: str
) -> tuple[Engine, float]:
    """An engine with `batch_size` rows of `context` random tokens each, prefilled in one step, with `steps` decode
    steps left to take; and the seconds that prefill took (`engine_options`: EngineConfig fields)."""
    config = EngineConfig(
        max_running=batch_size,
        max_context=context + steps + 2,
        max_num_batched_tokens=batch_size * (context + 1),  # every prompt whole in the first step
        **engine_options,
    )
    engine = Engine(loaded, config)
    rng = random.Random(0)
    vocab = engine.vocab_size
    for index in range(batch_size):
        prompt = [rng.randrange(vocab) for _ in range(context)]
        params = engine.make_parameters(max_new_tokens=steps + 2, ignore_eos=True)
        engine.submit(prompt, params, RequestOptions(request_id=str(index)))
    started = time.perf_counter()
    engine.step()  # prefills every row
    return engine, time.perf_counter() - started


def median_step(engine: Engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()  # ends with the step's host copy, so the device work is done
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_decode_step(
    loaded: LoadedModel, batch_size: int, context: int, steps: int = 8, **engine_options: str
) -> float:
    """Median seconds of an engine step that decodes `batch_size` rows holding `context` tokens each
    (`engine_options`: EngineConfig's decode_mode, linear_kernel)."""
    engine, _ = decoding_engine(loaded, batch_size, context, steps, **engine_options)
    return median_step(engine, steps)


def decode_latencies(
    loaded: LoadedModel, batch_sizes: list[int], context: int, steps: int = 8, **engine_options: str
) -> tuple[list[DecodeLatency], float]:
    """Per-step latency and floor at each batch size, and the bandwidth (bytes/s) the floors assume."""
    device = loaded.device
    bandwidth = copy_bandwidth(device)
    kv_bytes_per_token = SlotKVCache.for_model(loaded.model, 1, 1, 0).bytes_per_token
    weights = weight_bytes(loaded.model)
    results = []
    for batch_size in tqdm(batch_sizes, desc="decode latency", unit="batch size", leave=False):
        seconds = measure_decode_step(loaded, batch_size, context, steps, **engine_options)
        floor = (weights + batch_size * context * kv_bytes_per_token) / bandwidth
        results.append(DecodeLatency(batch_size, context, seconds, floor))
    return results, bandwidth


def format_decode_report(results: list[DecodeLatency], bandwidth: float, device: torch.device) -> str:
    lines = [
        f"decode step latency on {device} (measured copy bandwidth {bandwidth / 1e9:.1f} GB/s)",
        "| batch | context | step | bandwidth floor | step / floor | tokens/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.batch_size} | {result.context} | {result.seconds * 1e3:.3g} ms | "
            f"{result.floor_seconds * 1e3:.3g} ms | {result.ratio:.2f}x | {result.batch_size / result.seconds:.0f} |"
        )
    return "\n".join(lines)


def format_modes_report(by_mode: dict[str, list[DecodeLatency]], bandwidth: float, device: torch.device) -> str:
    """One column per mode (dtype): each step's time and its ratio to that mode's own floor (bf16 weights are
    half the bytes of fp32 ones, so their floor is lower)."""
    modes = list(by_mode)
    lines = [
        f"decode step latency per mode on {device} (measured copy bandwidth {bandwidth / 1e9:.1f} GB/s)",
        "| batch | context | " + " | ".join(f"{mode}: step (step / floor)" for mode in modes) + " |",
        "|---:|---:|" + "---:|" * len(modes),
    ]
    for index, first in enumerate(by_mode[modes[0]]):
        cells = [f"{by_mode[m][index].seconds * 1e3:.3g} ms ({by_mode[m][index].ratio:.2f}x)" for m in modes]
        lines.append(f"| {first.batch_size} | {first.context} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_decode_latency(results: list[DecodeLatency], bandwidth: float, device: torch.device, path: Path) -> None:
    """Step time and bandwidth floor per batch size, side by side (log scale: they span orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(result.batch_size) for result in results]
    positions = range(len(results))
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar([p - 0.2 for p in positions], [r.seconds * 1e3 for r in results], width=0.4, label="genserve step")
    axis.bar([p + 0.2 for p in positions], [r.floor_seconds * 1e3 for r in results], width=0.4, label="floor")
    for position, result in zip(positions, results):
        axis.annotate(f"{result.ratio:.1f}x", (position - 0.2, result.seconds * 1e3), ha="center", va="bottom")
    axis.set_xticks(list(positions), labels)
    axis.set_xlabel(f"batch size (context {results[0].context} tokens per row)")
    axis.set_ylabel("ms per decode step")
    axis.set_yscale("log")
    axis.set_title(f"decode step vs memory-bandwidth floor on {device} ({bandwidth / 1e9:.0f} GB/s)")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
