"""`make gpu-check`: the GPU paths, proven in one prepared run that leaves its results as files.

Only some sessions are lent a GPU, for minutes, so everything the GPU must show runs here at once and writes
`gpu_check.json` and `gpu_check.md` into `--out` (the device tool's `$OUT`):

1. **parity**: tiny random-weights models (Llama-, Qwen3-, Gemma 3- and Mixtral-shaped, from the parity suite's
   registry) serve staggered greedy and seeded requests through the engine; each output must equal
   `generate()` on that request alone, on the same device and dtype. Every model runs with decode steps eager
   and from CUDA graphs (on a CPU: the static padded pass the graphs capture), with the slot and the paged cache.
2. **decode step against the bandwidth floor**: a 1.5B-class shape with dummy weights, batch 1 to 256, with and
   without CUDA graphs (`genserve bench --decode-latency`'s measurement).
3. **throughput**: a mixed workload through genserve, HF `generate()` on static batches and transformers'
   continuous batching (`generate_batch`), in the same run (`genserve bench`'s measurement).
4. **tensor parallelism**: listed as not built until `--tensor-parallel-size` exists.

A failed check is named on stderr and the exit status is 1; nothing is skipped. `--device cpu --smoke` is the
dry run the test suite makes (smallest sizes), so that the script keeps working between device sessions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from genserve.scheduler.benchmarks.decode_latency import decode_latencies
from genserve.scheduler.benchmarks.throughput import default_workload, run_benchmark
from genserve.scheduler.model.loader import LoadedModel, load_model
from tests.architectures import SERVED, VOCAB, Case, save_tiny_model
from tests.conftest import StepDriver, hf_generate
from tests.references import with_plain_reference

PARITY_MODELS = ("Llama", "Qwen3", "Gemma 3", "Mixtral")
# (prompt, parameters, step it joins at): lengths differ, the long prompt runs past the sliding windows, the seeded
# rows sample beside greedy ones, and every request joins while the earlier ones decode.
PARITY_REQUESTS: list[tuple[list[int], dict, int]] = [
    ([17, 40, 3, 250, 99], {"max_new_tokens": 24}, 0),
    ([(i * 37) % VOCAB for i in range(3, 45)], {"max_new_tokens": 20}, 2),
    ([9, 8, 7, 6, 5, 4], {"max_new_tokens": 16, "do_sample": True, "temperature": 0.9, "top_k": 40, "seed": 11}, 3),
    ([(i * 11 + 5) % VOCAB for i in range(20)], {"max_new_tokens": 28}, 5),
    ([100, 200, 300], {"max_new_tokens": 12, "do_sample": True, "top_p": 0.9, "seed": 12}, 7),
    ([5], {"max_new_tokens": 18}, 9),
    # The second request's prompt again with a new ending: with prefix caching it continues the cached blocks.
    ([(i * 37) % VOCAB for i in range(3, 45)] + [11, 12, 13], {"max_new_tokens": 14}, 10),
]
PAGED_BYTES = 64 * 2**20
# (label, --kv-cache-memory, prefix caching): serve's default is the last.
CACHES = (("slot cache", 0, False), ("paged cache", PAGED_BYTES, False), ("paged, prefix caching", PAGED_BYTES, True))


@dataclass(frozen=True)
class Sizes:
    """How big each measured section runs: the GPU's sizes, or the CPU dry run's smallest."""

    dtypes: tuple[str, ...]
    decode_model: str  # a bundled shape (scheduler/model/model_configs/) or a model folder, run with dummy weights
    batch_sizes: tuple[int, ...]
    decode_context: int
    decode_steps: int
    throughput_prompts: int
    throughput_new_tokens: tuple[int, int]
    throughput_batch: int


GPU_SIZES = Sizes(("bfloat16", "float32"), "qwen2.5-1.5b", (1, 4, 16, 64, 256), 256, 8, 128, (16, 256), 64)
SMOKE_MODEL = "Llama"  # the dry run measures the tiny parity model, saved under this label
SMOKE_SIZES = Sizes(("float32",), SMOKE_MODEL, (1, 2), 16, 2, 4, (4, 8), 2)


@dataclass
class CheckResult:
    name: str
    passed: bool
    seconds: float
    detail: str = ""


@dataclass
class Report:
    device: str
    versions: dict[str, str]
    deadline: float  # time.perf_counter() after which checks are failed as not run, so the run ends in time
    out: Path | None = None  # rewritten after every check: a run cut short still leaves what it measured
    checks: list[CheckResult] = field(default_factory=list)
    decode_latency: list[dict] = field(default_factory=list)
    throughput: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]


def run_check(report: Report, name: str, check: Callable[[], str]) -> None:
    """Run one check; an exception or a false assertion fails it with its message, and the next check still runs."""
    started = time.perf_counter()
    if started > report.deadline:
        report.checks.append(CheckResult(name, False, 0.0, "not run: the run's time budget was spent"))
        print(f"[FAIL] {name}: not run, the run's time budget was spent", flush=True)
        return
    try:
        detail, passed = check(), True
    except Exception as error:  # noqa: BLE001 - every failure is recorded by name, none stops the run
        detail, passed = f"{type(error).__name__}: {error}", False
        traceback.print_exc()
    report.checks.append(CheckResult(name, passed, time.perf_counter() - started, detail))
    print(f"[{'PASS' if passed else 'FAIL'}] {name} ({time.perf_counter() - started:.1f} s) {detail}", flush=True)
    write_report(report)


def write_report(report: Report) -> None:
    if report.out is not None:
        report.out.mkdir(parents=True, exist_ok=True)
        fields = {key: value for key, value in asdict(report).items() if key != "out"}
        (report.out / "gpu_check.json").write_text(json.dumps(fields | {"failed": report.failed}, indent=1))
        (report.out / "gpu_check.md").write_text(markdown(report))


def decode_modes(device: torch.device) -> dict[str, str]:
    """Decode-step modes by label: eager, and the captured one (on a CPU the static pass it captures)."""
    if device.type == "cuda":
        return {"eager": "eager", "CUDA graphs": "auto"}
    return {"eager": "eager", "static (no capture)": "static"}


def references(loaded: LoadedModel) -> list[list[int]]:
    """generate() on each parity request alone."""
    make_parameters = StepDriver(loaded, max_running=1).engine.make_parameters
    return [
        hf_generate(loaded.model, prompt, make_parameters(**parameters)) for prompt, parameters, _ in PARITY_REQUESTS
    ]


def parity(
    loaded: LoadedModel, expected: list[list[int]], decode_mode: str, kv_cache_memory: int, prefix_caching: bool
) -> str:
    """Staggered greedy and seeded requests through the engine, each equal to generate() alone (`expected`)."""
    driver = StepDriver(
        loaded,
        max_running=4,
        max_context=128,
        decode_mode=decode_mode,
        kv_cache_memory=kv_cache_memory,
        prefix_caching=prefix_caching,
    )
    schedule: dict[int, list] = {}
    for index, (prompt, parameters, step) in enumerate(PARITY_REQUESTS):
        schedule.setdefault(step, []).append((f"r{index}", prompt, parameters))
    driver.run(schedule)
    for index, (prompt, parameters, _) in enumerate(PARITY_REQUESTS):
        expected = hf_generate(loaded.model, prompt, driver.engine.make_parameters(**parameters))
        served = driver.tokens.get(f"r{index}", [])
        if served != expected:
            first = next(
                (i for i, (a, b) in enumerate(zip(served, expected)) if a != b), min(len(served), len(expected))
            )
            raise AssertionError(f"request r{index} {parameters}: differs from generate() at token {first}")
    hits = driver.engine.runner.counters().prefix_hits
    equal = f"{len(PARITY_REQUESTS)} requests equal" + (f" ({hits} prompt tokens from the cache)" if hits else "")
    decoder = driver.engine.runner.static_decoder
    if decoder is None or decoder.device.type != "cuda":  # eager steps, or the static pass on a CPU
        return equal
    if decoder.captured_graphs == 0:  # the fallback the README promises; the warning says which op refused
        return f"{equal}; capture failed, so decode steps ran eagerly"
    return f"{equal}, {decoder.captured_graphs} CUDA graphs replayed"


def parity_checks(report: Report, device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Path]:
    """Every parity model in every dtype, decode mode and cache; the folders the models were saved in."""
    cases: dict[str, Case] = {case.label: case for case in SERVED}
    saved = {label: save_tiny_model(cases[label], folder / label.replace(" ", "-")) for label in PARITY_MODELS}
    for label, path in saved.items():
        for dtype in sizes.dtypes:
            loaded = load_model(str(path), dtype=dtype, device=str(device))
            with_plain_reference(loaded.model)  # the engine packs the model in place on a CPU
            expected = references(loaded)
            for mode_label, mode in decode_modes(device).items():
                for cache_label, kv_bytes, caching in CACHES:
                    name = f"parity {label} {dtype} {mode_label} {cache_label}"
                    run_check(report, name, lambda: parity(loaded, expected, mode, kv_bytes, caching))  # noqa: B023
    return saved


def load_measured(spec: str, device: torch.device, into: list[LoadedModel]) -> str:
    into.append(load_model(spec, load_format="dummy", device=str(device)))
    parameters = sum(parameter.numel() for parameter in into[0].model.parameters())
    return f"{parameters / 1e9:.2f}B parameters, {into[0].model.dtype}"


def decode_latency_check(report: Report, device: torch.device, sizes: Sizes, loaded: LoadedModel) -> None:
    def measure() -> str:
        dtype = str(loaded.model.dtype).removeprefix("torch.")
        for mode_label, mode in decode_modes(device).items():
            results, bandwidth = decode_latencies(
                loaded, list(sizes.batch_sizes), sizes.decode_context, sizes.decode_steps, decode_mode=mode
            )
            for result in results:
                report.decode_latency.append(
                    dict(
                        model=sizes.decode_model,
                        dtype=dtype,
                        mode=mode_label,
                        batch_size=result.batch_size,
                        context=result.context,
                        step_ms=result.seconds * 1e3,
                        floor_ms=result.floor_seconds * 1e3,
                        step_over_floor=result.ratio,
                        tokens_per_second=result.batch_size / result.seconds,
                        bandwidth_gb_s=bandwidth / 1e9,
                    )
                )
        return f"{len(report.decode_latency)} steps measured"

    run_check(report, "decode step against the bandwidth floor", measure)


def throughput_check(report: Report, sizes: Sizes, loaded: LoadedModel) -> None:
    def measure() -> str:
        low, high = sizes.throughput_new_tokens
        workload = default_workload(loaded, sizes.throughput_prompts, low, high)
        results, ceiling = run_benchmark(
            loaded, workload, sizes.throughput_batch, baselines=("static", "continuous"), log=print
        )
        ours = results[0]
        for result in results:
            report.throughput.append(
                dict(
                    system=result.name,
                    model=sizes.decode_model,
                    dtype=str(loaded.model.dtype).removeprefix("torch."),
                    requests=len(workload.prompts),
                    tokens=result.generated_tokens,
                    seconds=result.seconds,
                    tokens_per_second=result.tokens_per_second,
                    genserve_speedup=ours.tokens_per_second / result.tokens_per_second,
                )
            )
        report.notes.append(f"bare decode-step ceiling at batch {sizes.throughput_batch}: {ceiling:.0f} tokens/s")
        return f"genserve {ours.tokens_per_second:.0f} tokens/s"

    run_check(report, "throughput against HF static batches and generate_batch", measure)


DECODE_COLUMNS = (
    ("model", "{model}"),
    ("dtype", "{dtype}"),
    ("mode", "{mode}"),
    ("batch", "{batch_size}"),
    ("context", "{context}"),
    ("step", "{step_ms:.2f} ms"),
    ("floor", "{floor_ms:.2f} ms"),
    ("step / floor", "{step_over_floor:.2f}x"),
    ("tokens/s", "{tokens_per_second:.0f}"),
)
THROUGHPUT_COLUMNS = (
    ("system", "{system}"),
    ("model", "{model}"),
    ("dtype", "{dtype}"),
    ("requests", "{requests}"),
    ("tokens", "{tokens}"),
    ("seconds", "{seconds:.2f}"),
    ("tokens/s", "{tokens_per_second:.0f}"),
    ("genserve speed-up", "{genserve_speedup:.2f}x"),
)


def table(rows: list[dict], columns: tuple[tuple[str, str], ...]) -> list[str]:
    """A Markdown table of `rows`, one column per (header, format of a row's fields); text left, figures right."""
    if not rows:
        return []
    align = ["---" if spec in ("{model}", "{dtype}", "{mode}", "{system}") else "---:" for _, spec in columns]
    lines = ["", "| " + " | ".join(header for header, _ in columns) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(spec.format(**row) for _, spec in columns) + " |" for row in rows]


def markdown(report: Report) -> str:
    lines = [f"# genserve GPU check on {report.device}", ""]
    lines += [", ".join(f"{name} {version}" for name, version in report.versions.items()), ""]
    lines += ["| check | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.seconds:.1f} | {c.detail} |" for c in report.checks]
    lines += table(report.decode_latency, DECODE_COLUMNS)
    if report.decode_latency:
        lines += [f"\ncopy bandwidth measured: {report.decode_latency[0]['bandwidth_gb_s']:.0f} GB/s"]
    lines += table(report.throughput, THROUGHPUT_COLUMNS)
    lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (the check), or cpu for the dry run")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes (the test suite's CPU dry run)")
    parser.add_argument(
        "--budget-seconds", type=float, default=420, help="checks not started by then fail as not run (default 420)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAIL: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    started = time.perf_counter()
    report = Report(f"{device} ({name})", versions, deadline=started + args.budget_seconds, out=args.out)
    with tempfile.TemporaryDirectory() as folder:
        saved = parity_checks(report, device, sizes, Path(folder))
        spec = str(saved.get(sizes.decode_model, sizes.decode_model))
        loaded: list[LoadedModel] = []
        run_check(report, f"load {sizes.decode_model} with dummy weights", lambda: load_measured(spec, device, loaded))
        if loaded:
            decode_latency_check(report, device, sizes, loaded[0])
            throughput_check(report, sizes, loaded[0])
    report.notes.append("tensor parallelism: not built yet (--tensor-parallel-size), so no 2-rank check runs")
    report.notes.append(f"whole run: {time.perf_counter() - started:.0f} s")
    write_report(report)
    print(markdown(report))
    if report.failed:
        print("FAILED checks: " + "; ".join(report.failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
