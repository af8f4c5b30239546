"""`genserve bench`: the engine measured against Hugging Face's ways to serve the same workload, its features, its
decode step against the bandwidth floor, KV capacity and long-prompt stalls, and the peers (llama.cpp)."""

from __future__ import annotations

import argparse
import os
import sys

from genserve.scheduler import EngineConfig
from genserve.service.cli.flags import (
    AUTO_KV_CACHE_MEMORY,
    add_model_arguments,
    engine_config,
    int_range,
    load,
    load_options,
    memory_size,
)


def cmd_bench(args: argparse.Namespace) -> int:
    from genserve.scheduler.benchmarks.throughput import format_report, run_benchmark

    if args.tensor_parallel_size > 1:
        print(_tensor_parallel_report(args))  # served processes only: this process holds no model
        return 0
    loaded = load(args)
    features = [feature for feature in args.features.split(",") if feature]
    unknown = set(features) - {"prompt-lookup", "prefix-cache"}
    if unknown:
        raise SystemExit(f"unknown --features {sorted(unknown)}; choose from prompt-lookup, prefix-cache")
    baselines = tuple(b for b in args.baselines.split(",") if b)
    for peer, report in (("llama.cpp", _llama_cpp_report), ("vllm", _vllm_report)):
        if peer in baselines:
            print(report(loaded, args))
            baselines = tuple(b for b in baselines if b != peer)
            if not baselines:
                return 0
    if not args.skip_main:
        workload = _mixed_workload(loaded, args)
        results, ceiling = run_benchmark(
            loaded,
            workload,
            args.max_batch_size,
            baselines,
            log=lambda m: print(m, file=sys.stderr),
            engine_options=_bench_engine_options(args),
            genserve=_genserve_over_grpc(loaded, args) if args.through_grpc else None,
        )
        print(format_report(results, ceiling, args.max_batch_size))
        if args.through_http:
            print()
            print(_http_against_grpc(loaded, args, workload))
    for feature in features:
        print()
        print(_feature_report(feature, loaded, args))
    if args.kv_capacity:
        from genserve.scheduler.benchmarks.kv_capacity import capacity_workload, format_capacity_report, run_kv_capacity

        memory = int(args.kv_cache_memory) if args.kv_cache_memory > 1 else 2**30
        tokens = args.capacity_request_tokens
        workload = capacity_workload(loaded, args.capacity_requests, tokens, args.capacity_new_tokens)
        results = run_kv_capacity(loaded, memory, args.capacity_max_context, args.capacity_max_rows, workload)
        print()
        print(format_capacity_report(results, memory, args.capacity_max_context, tokens))
    if args.serving_memory:
        import tempfile
        from pathlib import Path

        from genserve.scheduler import model_folder
        from genserve.service.benchmarks.serving_memory import format_memory, measure

        folder, _ = model_folder(args.model)
        pool = int(args.kv_cache_memory) if args.kv_cache_memory > 1 else 512 * 2**20
        kernels = [k for k in args.decode_linear_kernels.split(",") if k] or ["aten", "onednn"]
        print()
        log = Path(tempfile.gettempdir()) / "genserve-serving-memory.log"  # the servers' logs, for a failed start
        modes = [(kernel, compiled) for compiled in ([False, True] if args.compile else [False]) for kernel in kernels]
        print(format_memory([measure(args.model, folder, kernel, pool, log, compiled) for kernel, compiled in modes]))
    if args.long_prompt:
        from genserve.scheduler.benchmarks.long_prompt import format_long_prompt_report, run_long_prompt

        config = engine_config(args, max_running=args.long_prompt_batch_size)
        print()
        print(format_long_prompt_report(*run_long_prompt(loaded, config, args.long_prompt_tokens)))
    if args.lora:
        from genserve.scheduler.benchmarks.lora import format_lora_report, run_lora_benchmark

        shape = (args.lora_rows, args.lora_context, args.lora_new_tokens)
        runs = run_lora_benchmark(loaded, *shape, args.lora_adapters, args.lora_rank, args.lora_rounds)
        print()
        print(format_lora_report(runs, *shape, args.lora_rank, args.lora_rounds))
    if args.decode_profile:
        from genserve.scheduler.benchmarks.step_profile import format_profile, profile_steps

        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
        config = engine_config(args)
        results = profile_steps(
            loaded, batch_sizes, args.decode_context, decode_mode=config.decode_mode, linear_kernel=config.linear_kernel
        )
        print()
        print(format_profile(results, args.decode_context))
    if args.decode_latency:
        from pathlib import Path

        from genserve.scheduler import load_model, onednn_applies, resolve_linear_kernel
        from genserve.scheduler.benchmarks.decode_latency import (
            decode_latencies,
            format_decode_report,
            format_modes_report,
            plot_decode_latency,
        )

        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
        config = engine_config(args)
        kernels = [k for k in args.decode_linear_kernels.split(",") if k] or [config.linear_kernel]
        by_mode = {}
        for dtype in [d for d in args.decode_dtypes.split(",") if d] or [None]:
            model = loaded if dtype is None else load_model(args.model, **(load_options(args) | {"dtype": dtype}))
            # oneDNN packing serves fp32 on CPU only: other dtypes get one column, with aten's matmul.
            applies = onednn_applies(model.model)
            resolved = dict.fromkeys(resolve_linear_kernel(k, model.model) if applies else "aten" for k in kernels)
            # aten first: the engine packs the model for oneDNN in place, for good.
            for kernel in sorted(resolved, key=lambda kernel: kernel != "aten"):
                measured = decode_latencies(
                    model, batch_sizes, args.decode_context, decode_mode=config.decode_mode, linear_kernel=kernel
                )
                by_mode[f"{str(model.model.dtype).removeprefix('torch.')} {kernel}"] = measured
        print()
        if len(by_mode) == 1:
            results, bandwidth = next(iter(by_mode.values()))
            print(format_decode_report(results, bandwidth, loaded.device))
            if args.decode_plot:
                plot_decode_latency(results, bandwidth, loaded.device, Path(args.decode_plot))
        else:
            bandwidth = next(iter(by_mode.values()))[1]
            print(format_modes_report({mode: r for mode, (r, _) in by_mode.items()}, bandwidth, loaded.device))
    return 0


def _bench_engine_options(args: argparse.Namespace) -> dict[str, object]:
    config = engine_config(args)
    return dict(
        decode_mode=config.decode_mode,
        max_num_batched_tokens=config.max_num_batched_tokens,
        linear_kernel=config.linear_kernel,
        kv_cache_memory=config.kv_cache_memory,
        prefix_caching=config.prefix_caching,
    )


def _genserve_over_grpc(loaded, args: argparse.Namespace):  # noqa: ANN001, ANN202 - keeps torch imports lazy
    """The bench's genserve run through a local gRPC server: every request a stream, all sent at once."""
    from genserve.scheduler import Engine, in_passing_thread
    from genserve.scheduler.benchmarks.throughput import BenchResult
    from genserve.service.benchmarks.local_server import local_server, stream_all
    from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

    def run(workload) -> BenchResult:  # noqa: ANN001 - a Workload
        config = engine_config(args, max_running=args.max_batch_size, max_queue=len(workload.prompts) + 1)
        engine = in_passing_thread(Engine, loaded, config)
        requests = [
            pb.GenerateRequest(input_ids=pb.TokenIds(ids=prompt), parameters=pb.GenerationParameters(max_new_tokens=n))
            for prompt, n in zip(workload.prompts, workload.max_new_tokens)
        ]
        with local_server(engine) as target:
            answer = stream_all(target, requests)
        outputs = answer.outputs
        first = tuple(answer.first_token_seconds)
        counters = engine.runner.counters()
        return BenchResult("genserve over gRPC", answer.seconds, answer.generated_tokens, outputs, counters, first)

    return run


def _http_against_grpc(loaded, args: argparse.Namespace, workload) -> str:  # noqa: ANN001 - a Workload
    """The workload over gRPC, then over the OpenAI HTTP API, each on a fresh engine behind a local server."""
    from genserve.scheduler import Engine, in_passing_thread
    from genserve.service.benchmarks.local_server import local_server, stream_all, stream_all_http
    from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

    def run(http: bool):  # noqa: ANN202
        config = engine_config(args, max_running=args.max_batch_size, max_queue=len(workload.prompts) + 1)
        engine = in_passing_thread(Engine, loaded, config)
        with local_server(engine, http=http) as target:
            if http:
                return stream_all_http(target, workload.prompts, workload.max_new_tokens)
            requests = [
                pb.GenerateRequest(
                    input_ids=pb.TokenIds(ids=prompt),
                    parameters=pb.GenerationParameters(max_new_tokens=n, do_sample=False),
                )
                for prompt, n in zip(workload.prompts, workload.max_new_tokens)
            ]
            return stream_all(target, requests)

    lines = [
        f"{len(workload.prompts)} requests at once, greedy, through a local server (one asyncio client)",
        "| front end | generated tokens | seconds | tokens/s | mean time to first token | x gRPC |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    runs = {"gRPC (genserve.v1 GenerateStream)": run(False), "HTTP (OpenAI /v1/completions, SSE)": run(True)}
    grpc_speed = None
    for name, answer in runs.items():
        tokens, speed = answer.generated_tokens, answer.tokens_per_second
        grpc_speed = grpc_speed or speed
        ttft = answer.mean_first_token_seconds
        lines.append(
            f"| {name} | {tokens} | {answer.seconds:.1f} | {speed:.1f} | {ttft:.2f} s | {speed / grpc_speed:.2f}x |"
        )
    return "\n".join(lines)


def _llama_cpp_report(loaded, args: argparse.Namespace) -> str:  # noqa: ANN001
    from pathlib import Path

    from genserve.scheduler import DEFAULT_MODEL, Engine, default_gguf_path
    from genserve.service.benchmarks.llama_cpp import compare, find_llama_server, format_comparison

    if args.model == DEFAULT_MODEL:
        gguf = default_gguf_path()
    elif args.model.endswith(".gguf"):
        gguf = Path(args.model)
    else:
        raise SystemExit("the llama.cpp baseline serves a GGUF file: --model default or --model FILE.gguf")
    from genserve.scheduler import in_passing_thread

    config = engine_config(args, max_running=args.parallel, max_queue=args.parallel + 1)
    engine = in_passing_thread(Engine, loaded, config)
    runs = compare(
        engine,
        gguf,
        find_llama_server(args.llama_server),
        args.parallel,
        args.prompt_tokens,
        args.new_tokens,
        args.threads or os.cpu_count() or 1,
        f"genserve ({loaded.model.dtype}, {loaded.attn_implementation})".replace("torch.", ""),
    )
    return format_comparison(runs, args.parallel, args.prompt_tokens, args.new_tokens)


def _vllm_report(loaded, args: argparse.Namespace) -> str:  # noqa: ANN001
    """genserve over gRPC against vLLM's CPU build, on the peers' fixed workload and the mixed chat workload."""
    from pathlib import Path

    from genserve.scheduler.benchmarks.throughput import Workload
    from genserve.service.benchmarks.llama_cpp import fixed_prompts
    from genserve.service.benchmarks.local_server import serve_process, stream_all
    from genserve.service.benchmarks.vllm_cpu import compare, format_comparison
    from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

    if not args.vllm_python:
        raise SystemExit("the vllm baseline needs --vllm-python PATH: the python of a vllm-cpu environment")
    if loaded.folder is None:
        raise SystemExit("the vllm baseline serves the model's weights folder: not --load-format dummy")
    rows = args.max_batch_size
    workloads = {
        f"{args.parallel} x {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens": Workload(
            fixed_prompts(loaded.tokenizer, args.parallel, args.prompt_tokens), [args.new_tokens] * args.parallel
        ),
        f"{args.num_prompts} mixed chat prompts, {args.min_new_tokens}..{args.max_new_tokens} new tokens": (
            _mixed_workload(loaded, args)
        ),
    }

    def run_genserve(workload: Workload, compiled: bool):  # noqa: ANN202 - a StreamedRun
        requests = [
            pb.GenerateRequest(
                input_ids=pb.TokenIds(ids=prompt),
                parameters=pb.GenerationParameters(max_new_tokens=n, do_sample=False, ignore_eos=True),
            )
            for prompt, n in zip(workload.prompts, workload.max_new_tokens)
        ]
        flags = _serve_flags(args, rows, len(requests)) + (["--compile"] if compiled else [])
        with serve_process(flags, Path(args.vllm_log)) as served:
            stream_all(served.grpc_target, requests[:1])  # warm-up, as vLLM gets one
            return stream_all(served.grpc_target, requests)

    results = compare(
        {
            "genserve": lambda workload: run_genserve(workload, compiled=False),
            "genserve --compile": lambda workload: run_genserve(workload, compiled=True),
        },
        workloads,
        Path(args.vllm_python),
        loaded.folder,
        rows,
        args.enable_prefix_caching and args.kv_cache_memory > 0,
        Path(args.vllm_log),
        progress=lambda message: print(message, file=sys.stderr),
        rounds=args.vllm_rounds,
    )
    return format_comparison(results)


def _tensor_parallel_report(args: argparse.Namespace) -> str:
    """`genserve serve` with 1 and with N ranks, one after the other, on two shapes of the fixed workload (all
    rows at once, and one stream alone), through gRPC: tokens/s and mean time to first token."""
    from pathlib import Path

    from genserve.service.benchmarks.local_server import serve_process, stream_all
    from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

    # Token ids, not text: --load-format dummy has no tokenizer. Ids 3..299 exist in every served vocabulary.
    def requests(count: int) -> list[pb.GenerateRequest]:
        parameters = pb.GenerationParameters(max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True)
        return [
            pb.GenerateRequest(
                input_ids=pb.TokenIds(ids=[3 + (row * 31 + j * 7) % 297 for j in range(args.prompt_tokens)]),
                parameters=parameters,
            )
            for row in range(count)
        ]

    shapes = {f"{args.parallel} x {args.prompt_tokens} tokens": args.parallel, f"1 x {args.prompt_tokens} tokens": 1}
    lines = [
        f"tensor parallelism, {args.new_tokens} new tokens per request, device {args.device}",
        "",
        "| ranks | workload | tokens/s | mean time to first token (s) |",
        "|---:|---|---:|---:|",
    ]
    for ranks in sorted({1, args.tensor_parallel_size}):
        flags = _serve_flags(args, args.parallel, args.parallel) + ["--tensor-parallel-size", str(ranks)]
        print(f"serving with {ranks} rank(s)", file=sys.stderr)
        with serve_process(flags, Path(args.vllm_log)) as served:
            stream_all(served.grpc_target, requests(1))  # warm-up
            for label, count in shapes.items():
                run = stream_all(served.grpc_target, requests(count))
                lines.append(
                    f"| {ranks} | {label} | {run.tokens_per_second:.1f} | {run.mean_first_token_seconds:.3f} |"
                )
    return "\n".join(lines)


def _mixed_workload(loaded, args: argparse.Namespace):  # noqa: ANN001, ANN202 - a throughput.Workload
    """The mixed chat workload that the bench's flags describe."""
    from genserve.scheduler.benchmarks.throughput import default_workload

    return default_workload(
        loaded,
        num_prompts=args.num_prompts,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        context_paragraphs=int_range(args.context_paragraphs, "--context-paragraphs"),
    )


def _serve_flags(args: argparse.Namespace, rows: int, queue: int) -> list[str]:
    """`genserve serve`'s flags for the engine this bench's flags describe."""
    config = engine_config(args, max_running=rows, max_queue=queue + 1)
    flags = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--load-format", args.load_format]
    flags += ["--linear-kernel", config.linear_kernel, "--attn-implementation", args.attn_implementation]
    flags += ["--max-batch-size", str(rows), "--max-queue", str(queue + 1), "--max-context", str(config.max_context)]
    flags += ["--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    flags += [
        "--kv-cache-memory",
        str(int(config.kv_cache_memory) if config.kv_cache_memory > 1 else config.kv_cache_memory),
    ]
    flags.append("--enable-prefix-caching" if config.prefix_caching else "--no-enable-prefix-caching")
    return flags + (["--no-cuda-graphs"] if args.no_cuda_graphs else [])


def _feature_report(feature: str, loaded, args: argparse.Namespace) -> str:  # noqa: ANN001
    from genserve.scheduler.benchmarks import features as bench

    prompts, batch, new_tokens = args.feature_prompts, args.feature_batch_size, args.feature_max_new_tokens
    if feature == "prompt-lookup":
        workload = bench.quoting_workload(loaded, prompts, new_tokens, seed=args.seed)
        lookup = dict(prompt_lookup_num_tokens=args.lookup_tokens)
        comparison = bench.compare("prompt lookup", loaded, workload, batch, overrides=lookup)
    else:
        workload = bench.shared_prefix_workload(loaded, prompts, new_tokens)
        pool = dict(kv_cache_memory=args.kv_cache_memory or AUTO_KV_CACHE_MEMORY[loaded.device.type])
        comparison = bench.compare(
            "prefix caching",
            loaded,
            workload,
            batch,
            engine_options=pool | dict(prefix_caching=True),
            plain_options=pool | dict(prefix_caching=False),
        )
    return bench.format_feature_report(comparison, workload)


def add_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="engine throughput against HF generate() baselines, in one run",
        description="Runs one workload through genserve's engine (no gRPC) and, in the same run, through HF "
        "generate() one request at a time, HF static batches and transformers' continuous batching; prints "
        "tokens/s, the ratios, and how close genserve comes to a bare decode step at the same batch size.",
    )
    add_model_arguments(bench)
    bench.add_argument("--max-batch-size", type=int, default=64, help="engine rows, and the HF static batch size")
    bench.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=EngineConfig.max_num_batched_tokens,
        help="the engine's tokens per step (decoding rows and prompt chunks)",
    )
    bench.add_argument(
        "--kv-cache-memory",
        type=memory_size,
        default=0.0,
        help="genserve's paged KV cache of this size (as serve's flag; 0: a slot per row); the baseline "
        "'slots' then runs genserve with slots in the same run",
    )
    bench.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --kv-cache-memory, share prompt prefixes' blocks between requests, as serve does by default",
    )
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--min-new-tokens", type=int, default=16, help="max_new_tokens is drawn from [min, max]")
    bench.add_argument("--max-new-tokens", type=int, default=256)
    bench.add_argument("--seed", type=int, default=0, help="workload seed")
    bench.add_argument(
        "--context-paragraphs",
        default="0,6",
        help="MIN,MAX paragraphs of background before each question (about 45 tokens each; 1,1 gives the 65 to "
        "90-token chat prompts of a typical assistant workload)",
    )
    bench.add_argument(
        "--through-grpc",
        action="store_true",
        help="measure genserve through a local gRPC server (every request a stream, all sent at once) instead of "
        "the engine alone",
    )
    bench.add_argument(
        "--through-http",
        action="store_true",
        help="also run the workload through a local server over gRPC and over the OpenAI-compatible HTTP API, "
        "side by side, and report what the HTTP layer costs",
    )
    bench.add_argument(
        "--baselines",
        default="sequential,static,continuous",
        help="comma-separated subset of: sequential, static, continuous, slots (genserve with a KV slot per row, "
        "against --kv-cache-memory's paged cache), llama.cpp (llama-server on the model's GGUF, as shipped and "
        "requantized to F32, against genserve over gRPC; see the llama.cpp options), vllm (vLLM's CPU build over "
        "its OpenAI API, with its defaults and with every core bound to compute, against genserve over gRPC, on "
        "the llama.cpp options' fixed workload and on the mixed chat workload; needs --vllm-python)",
    )
    llama = bench.add_argument_group(
        "llama.cpp and vLLM", "the peers' fixed workload: all requests sent at once, eos ignored"
    )
    llama.add_argument("--llama-server", help="path to llama-server (default: on PATH); llama-quantize beside it")
    llama.add_argument("--parallel", type=int, default=16, help="requests, llama-server slots and genserve rows")
    llama.add_argument("--prompt-tokens", type=int, default=80, help="tokens per prompt")
    llama.add_argument("--new-tokens", type=int, default=96, help="tokens generated per request (eos ignored)")
    llama.add_argument("--threads", type=int, default=0, help="llama-server threads (0: every core)")
    llama.add_argument(
        "--vllm-python", help="the python of a vllm-cpu environment (../shared/tools/vllm-cpu-venv.sh builds one)"
    )
    llama.add_argument(
        "--vllm-log", default="vllm-baseline.log", help="where vLLM's (and served genserve's) log is appended"
    )
    llama.add_argument(
        "--vllm-rounds",
        type=int,
        default=1,
        help="run every system on every workload this many times over, in turn, and report medians (a shared "
        "host's speed swings between runs; about 9 minutes a round for the default model on 2 cores)",
    )
    llama.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="N > 1: only this report: `genserve serve` with 1 and with N ranks on the fixed workload (--parallel "
        "rows of --prompt-tokens, and one stream alone), through gRPC; with --device cuda --load-format dummy on "
        "a GPU node (README: Tensor parallelism)",
    )
    features = bench.add_argument_group(
        "features", "genserve with and without a feature, on a workload made for it, in the same run"
    )
    features.add_argument(
        "--features",
        default="",
        help="comma-separated: prompt-lookup (quote-back prompts), prefix-cache (shared few-shot system prompt)",
    )
    features.add_argument(
        "--skip-main", action="store_true", help="skip the main workload (genserve against the HF baselines)"
    )
    features.add_argument("--feature-prompts", type=int, default=16, help="requests per feature workload")
    features.add_argument("--feature-batch-size", type=int, default=8, help="engine rows for the feature runs")
    features.add_argument("--feature-max-new-tokens", type=int, default=128)
    features.add_argument("--lookup-tokens", type=int, default=4, help="prompt_lookup_num_tokens for its run")
    features.add_argument(
        "--serving-memory",
        action="store_true",
        help="`genserve serve`'s resident memory after warm-up against its parts (weights, KV pool, libraries), "
        "per --decode-linear-kernels (default aten,onednn), with --kv-cache-memory's pool (default 512MiB here); "
        "with --compile, each kernel served with the compiled decode step as well",
    )
    decode = bench.add_argument_group(
        "decode latency", "one engine decode step per batch size against the memory-bandwidth floor"
    )
    decode.add_argument("--decode-latency", action="store_true", help="measure and print the table")
    decode.add_argument(
        "--decode-profile",
        action="store_true",
        help="per batch size, the prefill of every row and a decode step split into Linear GEMMs, attention, "
        "other ops and Python (torch.profiler)",
    )
    decode.add_argument("--batch-sizes", default="1,8,32,128", help="comma-separated batch sizes")
    decode.add_argument("--decode-context", type=int, default=256, help="tokens each row holds")
    decode.add_argument("--decode-plot", help="also draw the table as a bar chart into this PNG file")
    decode.add_argument(
        "--decode-dtypes",
        default="",
        help="comma-separated dtypes (e.g. float32,bfloat16), one column each, the model loaded in each; "
        "default: --dtype alone",
    )
    decode.add_argument(
        "--decode-linear-kernels",
        default="",
        help="comma-separated linear kernels (aten,onednn): one column each for every fp32 dtype on CPU; "
        "default: --linear-kernel alone",
    )
    capacity = bench.add_argument_group(
        "KV capacity",
        "requests served at once in one KV budget (--kv-cache-memory, default 1GiB here): a slot of "
        "--capacity-max-context positions per row against paged blocks, in one run",
    )
    capacity.add_argument("--kv-capacity", action="store_true", help="measure and print the table")
    capacity.add_argument("--capacity-max-context", type=int, default=16384, help="the context both designs serve")
    capacity.add_argument("--capacity-requests", type=int, default=80, help="requests, all sent at once")
    capacity.add_argument("--capacity-request-tokens", type=int, default=300, help="tokens each request holds")
    capacity.add_argument("--capacity-new-tokens", type=int, default=200, help="of which generated")
    capacity.add_argument("--capacity-max-rows", type=int, default=128, help="the paged run's row limit")
    stall = bench.add_argument_group(
        "long prompt", "how long running streams stall while a long prompt is prefilled, chunked and whole"
    )
    stall.add_argument("--long-prompt", action="store_true", help="measure and print the table")
    stall.add_argument("--long-prompt-tokens", type=int, default=1500, help="the long prompt's length (at least)")
    stall.add_argument("--long-prompt-batch-size", type=int, default=8, help="engine rows for these runs")
    lora = bench.add_argument_group(
        "LoRA", "decode step and tokens/s with LoRA adapters (random, every projection) against the base model alone"
    )
    lora.add_argument("--lora", action="store_true", help="measure and print the table")
    lora.add_argument("--lora-rows", type=int, default=16, help="requests, all decoding together")
    lora.add_argument("--lora-adapters", type=int, default=4, help="adapters the mixed run spreads rows over")
    lora.add_argument("--lora-rank", type=int, default=16)
    lora.add_argument("--lora-context", type=int, default=64, help="prompt tokens per request")
    lora.add_argument("--lora-new-tokens", type=int, default=64, help="tokens generated per request")
    lora.add_argument(
        "--lora-rounds", type=int, default=3, help="times the adapter runs repeat in turn (each reports its median)"
    )
    bench.set_defaults(handler=cmd_bench)
