"""`genserve bench --decode-profile`: where the milliseconds of a prefill and a decode step go, per batch size.

Each batch size gets an engine whose rows hold `context` random tokens, prefilled in one step (timed); a few
decode steps are timed without the profiler (the step's median), then profiled with torch.profiler. Each op's
own time goes to one of: the Linear layers' GEMMs (oneDNN's, or aten's matmul), attention (SDPA), and every other
op (norms, rotary, activations, indexing, sampling). What the ops do not account for of the unprofiled step is
Python and dispatch: the engine's, the model's modules, and the profiler-free overhead of calling each op.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from genserve.scheduler.benchmarks.decode_latency import decoding_engine, median_step
from genserve.scheduler.model.loader import LoadedModel

LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear")


@dataclass(frozen=True)
class StepProfile:
    batch_size: int
    prefill_tokens: int
    prefill_seconds: float
    step_seconds: float  # median decode step, without the profiler
    linear_seconds: float  # per step, from here on
    attention_seconds: float
    other_op_seconds: float

    @property
    def python_seconds(self) -> float:
        return self.step_seconds - self.linear_seconds - self.attention_seconds - self.other_op_seconds


def _category(op: str) -> str:
    if op in LINEAR_OPS:
        return "linear"
    return "attention" if "scaled_dot_product" in op else "other"


def profile_steps(
    loaded: LoadedModel, batch_sizes: list[int], context: int, steps: int = 6, **engine_options: str
) -> list[StepProfile]:
    results = []
    for batch_size in tqdm(batch_sizes, desc="decode profile", unit="batch size", leave=False):
        engine, prefill = decoding_engine(loaded, batch_size, context, 2 * steps + 2, **engine_options)
        engine.step()  # the first decode step pays one-off costs
        step = median_step(engine, steps)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                engine.step()
        seconds = {"linear": 0.0, "attention": 0.0, "other": 0.0}
        # Top-level ops only: a composite op's own time already excludes what the ops it calls took.
        for event in profiler.key_averages():
            seconds[_category(event.key)] += event.self_cpu_time_total / 1e6 / steps
        results.append(
            StepProfile(
                batch_size,
                batch_size * context,
                prefill,
                step,
                seconds["linear"],
                seconds["attention"],
                seconds["other"],
            )
        )
    return results


def format_profile(results: list[StepProfile], context: int) -> str:
    lines = [
        f"prefill and decode steps, rows of {context} tokens (ms; the decode columns split one step)",
        "| rows | prefill (tokens) | decode step | Linear GEMMs | attention | other ops | Python and dispatch |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            # Two decimals: a small model's attention takes under 0.05 ms a step, which one decimal shows as 0.
            f"| {r.batch_size} | {r.prefill_seconds * 1e3:.0f} ({r.prefill_tokens}) | {r.step_seconds * 1e3:.2f} | "
            f"{r.linear_seconds * 1e3:.2f} | {r.attention_seconds * 1e3:.2f} | {r.other_op_seconds * 1e3:.2f} | "
            f"{r.python_seconds * 1e3:.2f} |"
        )
    return "\n".join(lines)
