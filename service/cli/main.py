"""The `genserve` command: serve the model over gRPC, benchmark the engine, or talk to a running server."""

from __future__ import annotations

import argparse
import os
import re
import sys

from genserve.scheduler.core.config import LINEAR_KERNELS, EngineConfig


def _env(name: str, default: str) -> str:
    """Flags default to GENSERVE_* environment variables, so a container is configured without a command line."""
    return os.environ.get(f"GENSERVE_{name.upper()}", default)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=_env("model", "default"),
        help="'default' (SmolLM2-135M-Instruct, bundled), a local Hugging Face model folder, or a .gguf file",
    )
    group.add_argument(
        "--dtype", default=_env("dtype", "auto"), help="auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16"
    )
    group.add_argument("--device", default=_env("device", "auto"), help="auto (CUDA when present), cpu, cuda, cuda:N")
    group.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        default=_env("no_cuda_graphs", "") == "1",
        help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured per batch-size bucket",
    )
    group.add_argument(
        "--linear-kernel",
        default=_env("linear_kernel", "auto"),
        choices=LINEAR_KERNELS,
        help="auto: on CPU, fp32 Linear layers multiply with weights prepacked once for oneDNN, q/k/v and gate/up "
        "as one GEMM each (decode steps 1.3-1.4x faster than with aten's matmul on the README's machine; costs a "
        "second copy of those weights); aten elsewhere",
    )
    group.add_argument(
        "--attn-implementation",
        default=_env("attn_implementation", "auto"),
        choices=["auto", "sdpa", "eager"],
        help="auto: sdpa where the model supports it, eager where it needs it (e.g. Gemma 2's attention "
        "soft-capping); the choice is logged and reported by ModelInfo",
    )
    group.add_argument(
        "--load-format",
        default=_env("load_format", "auto"),
        choices=["auto", "dummy"],
        help="dummy: random weights from the model's config, for benchmarks where the weights can't go",
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine limits")
    group.add_argument(
        "--max-batch-size", type=int, default=int(_env("max_batch_size", "64")), help="most rows decoded together"
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=int(_env("max_num_batched_tokens", str(EngineConfig.max_num_batched_tokens))),
        help="tokens computed per engine step, shared by the decoding rows (one each) and prompt chunks: a longer "
        "prompt is prefilled over several steps while the other streams keep going (must exceed --max-batch-size)",
    )
    group.add_argument(
        "--max-queue",
        type=int,
        default=int(_env("max_queue", "1024")),
        help="waiting requests before RESOURCE_EXHAUSTED",
    )
    group.add_argument(
        "--max-context", type=int, default=int(_env("max_context", "2048")), help="prompt + new tokens per request"
    )
    group.add_argument(
        "--kv-cache-memory",
        type=memory_size,
        default=memory_size(_env("kv_cache_memory", "0")),
        help="a paged KV cache of this size (e.g. 1GiB, 512MiB; or 0.9: that fraction of the device's free "
        "memory): requests are admitted by the KV blocks they hold and preempted when blocks run out, so long "
        "contexts and many rows share one budget. 0 (default): each row holds a slot of --max-context "
        "positions, faster on CPU (README: KV memory)",
    )
    group.add_argument(
        "--kv-admission-reserve",
        type=float,
        default=float(_env("kv_admission_reserve", str(EngineConfig.kv_admission_reserve))),
        help="paged cache: share of its blocks that admitting a request must leave free, for running rows to "
        "grow into before any is preempted",
    )
    group.add_argument(
        "--max-requests-per-client",
        type=int,
        default=int(_env("max_requests_per_client", "0")),
        help="in-flight requests per client (x-client-id metadata, else its address); 0: unlimited",
    )


_SIZE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def memory_size(text: str) -> float:
    """'1GiB', '512MiB', '2G', '1000000' (bytes), or a fraction <= 1 of the free device memory ('0.9')."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (1GiB, 512MiB) or a fraction (0.9)")
    return float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine features")
    group.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        default=_env("enable_prefix_caching", "") == "1",
        help="reuse the KV of prompt prefixes seen before (system prompts, few-shot examples); off by default "
        "because reused keys shift logits by ~1e-5, so outputs may differ from generate() at near-ties",
    )
    group.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=int(_env("prefix_cache_tokens", "16384")),
        help="tokens of KV the prefix cache keeps (least recently used blocks are evicted)",
    )
    group.add_argument(
        "--assistant-model",
        default=_env("assistant_model", "") or None,
        help="a smaller model with the same tokenizer (HF folder or .gguf) for speculative decoding: it proposes, "
        "the model verifies a batch of proposals per pass; greedy outputs stay identical",
    )
    group.add_argument(
        "--num-assistant-tokens",
        type=int,
        default=int(_env("num_assistant_tokens", "4")),
        help="tokens the assistant proposes per step, unless a request sets its own (0 turns it off)",
    )
    group.add_argument(
        "--speculative-max-batch-size",
        type=int,
        default=int(_env("speculative_max_batch_size", "16")),
        help="speculate (prompt lookup, assistant) only in steps decoding at most this many rows: verifying "
        "proposals costs compute, which a large batch no longer has spare (measured on CPU: 1.42x faster at "
        "8 rows, 0.86x at 32)",
    )


def _engine(args: argparse.Namespace, loaded, plugins=None):  # noqa: ANN001, ANN202 - keeps torch-free imports lazy
    """The engine, built (its start-up probe pass included) off the main thread: see scheduler/model/cpu_threads.py."""
    from genserve.scheduler.core.engine import Engine
    from genserve.scheduler.features.plugins import PluginRegistry
    from genserve.scheduler.model.cpu_threads import in_passing_thread
    from genserve.scheduler.model.loader import load_model

    def build() -> Engine:
        assistant = None
        if args.assistant_model:
            assistant = load_model(args.assistant_model, **_load_options(args))
        return Engine(loaded, engine_config(args), plugins=plugins or PluginRegistry(), assistant=assistant)

    return in_passing_thread(build)


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """The one EngineConfig of the flags that `args` has (commands take subsets of them), with `overrides`."""
    flags = dict(
        max_running=getattr(args, "max_batch_size", None),
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", None),
        max_queue=getattr(args, "max_queue", None),
        max_context=getattr(args, "max_context", None),
        prefix_cache_tokens=args.prefix_cache_tokens if getattr(args, "enable_prefix_caching", False) else None,
        num_assistant_tokens=getattr(args, "num_assistant_tokens", None),
        speculation_max_rows=getattr(args, "speculative_max_batch_size", None),
        decode_mode="eager" if getattr(args, "no_cuda_graphs", False) else "auto",
        linear_kernel=getattr(args, "linear_kernel", None),
        kv_cache_memory=getattr(args, "kv_cache_memory", None),
        kv_admission_reserve=getattr(args, "kv_admission_reserve", None),
    )
    return EngineConfig(**{name: value for name, value in flags.items() if value is not None} | overrides)


def _load(args: argparse.Namespace):  # noqa: ANN202
    """The model, loaded off the main thread: see scheduler/model/cpu_threads.py."""
    from genserve.scheduler.model.cpu_threads import in_passing_thread
    from genserve.scheduler.model.loader import load_model

    return in_passing_thread(load_model, args.model, **_load_options(args))


def _load_options(args: argparse.Namespace) -> dict[str, str]:
    return dict(
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        attn_implementation=args.attn_implementation,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from genserve.scheduler.benchmarks.throughput import default_workload, format_report, run_benchmark

    loaded = _load(args)
    features = [feature for feature in args.features.split(",") if feature]
    unknown = set(features) - {"prompt-lookup", "prefix-cache"}
    if unknown:
        raise SystemExit(f"unknown --features {sorted(unknown)}; choose from prompt-lookup, prefix-cache")
    baselines = tuple(b for b in args.baselines.split(",") if b)
    if "llama.cpp" in baselines:
        print(_llama_cpp_report(loaded, args))
        baselines = tuple(b for b in baselines if b != "llama.cpp")
        if not baselines:
            return 0
    if not args.skip_main:
        workload = default_workload(
            loaded,
            num_prompts=args.num_prompts,
            min_new_tokens=args.min_new_tokens,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            context_paragraphs=_range(args.context_paragraphs, "--context-paragraphs"),
        )
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
    if args.long_prompt:
        from genserve.scheduler.benchmarks.long_prompt import format_long_prompt_report, run_long_prompt

        config = engine_config(args, max_running=args.long_prompt_batch_size)
        print()
        print(format_long_prompt_report(*run_long_prompt(loaded, config, args.long_prompt_tokens)))
    if args.decode_latency:
        from pathlib import Path

        from genserve.scheduler.benchmarks.decode_latency import (
            decode_latencies,
            format_decode_report,
            format_modes_report,
            plot_decode_latency,
        )
        from genserve.scheduler.model.cpu_linear import onednn_applies, resolve_linear_kernel
        from genserve.scheduler.model.loader import load_model

        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
        config = engine_config(args)
        kernels = [k for k in args.decode_linear_kernels.split(",") if k] or [config.linear_kernel]
        by_mode = {}
        for dtype in [d for d in args.decode_dtypes.split(",") if d] or [None]:
            model = loaded if dtype is None else load_model(args.model, **(_load_options(args) | {"dtype": dtype}))
            # oneDNN packing serves fp32 on CPU only: other dtypes get one column, with aten's matmul.
            applies = onednn_applies(model.model)
            for kernel in dict.fromkeys(resolve_linear_kernel(k, model.model) if applies else "aten" for k in kernels):
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
    )


def _genserve_over_grpc(loaded, args: argparse.Namespace):  # noqa: ANN001, ANN202 - keeps torch imports lazy
    """The bench's genserve run through a local gRPC server: every request a stream, all sent at once."""
    from genserve.scheduler.benchmarks.throughput import BenchResult
    from genserve.scheduler.core.engine import Engine
    from genserve.scheduler.model.cpu_threads import in_passing_thread
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
        return BenchResult("genserve over gRPC", answer.seconds, sum(map(len, outputs)), outputs, counters, first)

    return run


def _llama_cpp_report(loaded, args: argparse.Namespace) -> str:  # noqa: ANN001
    from pathlib import Path

    from genserve.scheduler.core.engine import Engine
    from genserve.scheduler.model.loader import DEFAULT_MODEL, default_gguf_path
    from genserve.service.benchmarks.llama_cpp import compare, find_llama_server, format_comparison

    if args.model == DEFAULT_MODEL:
        gguf = default_gguf_path()
    elif args.model.endswith(".gguf"):
        gguf = Path(args.model)
    else:
        raise SystemExit("the llama.cpp baseline serves a GGUF file: --model default or --model FILE.gguf")
    from genserve.scheduler.model.cpu_threads import in_passing_thread

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


def _feature_report(feature: str, loaded, args: argparse.Namespace) -> str:  # noqa: ANN001
    from genserve.scheduler.benchmarks import features as bench

    prompts, batch, new_tokens = args.feature_prompts, args.feature_batch_size, args.feature_max_new_tokens
    if feature == "prompt-lookup":
        workload = bench.quoting_workload(loaded, prompts, new_tokens, seed=args.seed)
        lookup = dict(prompt_lookup_num_tokens=args.lookup_tokens)
        comparison = bench.compare("prompt lookup", loaded, workload, batch, overrides=lookup)
    else:
        workload = bench.shared_prefix_workload(loaded, prompts, new_tokens)
        caching = dict(prefix_cache_tokens=16384)
        comparison = bench.compare("prefix caching", loaded, workload, batch, engine_options=caching)
    return bench.format_feature_report(comparison, workload)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from genserve.scheduler.features.plugins import PluginRegistry, parse_registrations
    from genserve.service.ops.security import TLSConfig, read_tokens
    from genserve.service.server import GenerationServer, ServerOptions

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = TLSConfig(
            Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None
        )
    elif args.tls_client_ca:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    options = ServerOptions(
        host=args.host,
        port=args.port,
        grace_seconds=args.drain_seconds,
        metrics_port=args.metrics_port,
        tls=tls,
        auth_tokens=read_tokens(Path(args.auth_token_file)) if args.auth_token_file else None,
        max_message_bytes=args.max_message_bytes,
        max_requests_per_client=args.max_requests_per_client or None,
        stream_retention_seconds=args.stream_retention_seconds,
    )
    loaded = _load(args)
    plugins = PluginRegistry(
        logits_processors=parse_registrations(args.logits_processor),
        stopping_criteria=parse_registrations(args.stopping_criteria),
    )
    server = GenerationServer(_engine(args, loaded, plugins), options)
    asyncio.run(server.serve_until_signal())
    return 0


def _client_request(args: argparse.Namespace, messages: list[dict[str, str]] | None = None):  # noqa: ANN202
    from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

    parameters = pb.GenerationParameters()
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        value = getattr(args, name)
        if value is not None:
            setattr(parameters, name, value)
    # A CLI user who sets a temperature wants sampling (generate() would need do_sample=True as well).
    parameters.do_sample = bool(args.temperature) or args.do_sample
    parameters.stop_strings.extend(args.stop)
    if args.prompt_lookup is not None:
        parameters.prompt_lookup_num_tokens = args.prompt_lookup
    if args.guidance_scale is not None:
        parameters.guidance_scale = args.guidance_scale
    if messages is not None:
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
        request = pb.GenerateRequest(messages=chat, parameters=parameters)
    else:
        request = pb.GenerateRequest(text=args.prompt, parameters=parameters)
    if args.negative_prompt is not None:
        request.negative_text = args.negative_prompt
    if args.regex is not None:
        request.constraint.regex = args.regex
    elif args.json_schema is not None:
        request.constraint.json_schema = _text_or_file(args.json_schema)
    elif args.choice:
        request.constraint.choice.choices.extend(args.choice)
    elif args.grammar is not None:
        request.constraint.grammar = _text_or_file(args.grammar)
    return request


def _text_or_file(value: str) -> str:
    """A flag that takes either its text or the path of a file holding it."""
    from pathlib import Path

    path = Path(value)
    return path.read_text() if len(value) < 4096 and path.is_file() else value


def _stub(target: str):  # noqa: ANN202
    import grpc

    from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc

    return generate_pb2_grpc.TextGenerationStub(grpc.insecure_channel(target))


def _stream_to_stdout(stub, request) -> str:  # noqa: ANN001
    import grpc

    text = []
    try:
        for message in stub.GenerateStream(request):
            print(message.text, end="", flush=True)
            text.append(message.text)
    except grpc.RpcError as error:
        print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
        raise SystemExit(1) from None
    print()
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    stub = _stub(args.target)
    request = _client_request(args)
    if args.stream:
        _stream_to_stdout(stub, request)
        return 0
    try:
        response = stub.Generate(request)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(response.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    stub = _stub(args.target)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("genserve chat: type a message, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream_to_stdout(stub, _client_request(args, messages))
        messages.append({"role": "assistant", "content": reply})


def _range(text: str, flag: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        pair = int(low), int(high or low)
    except ValueError:
        raise SystemExit(f"{flag} takes MIN,MAX (integers), got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise SystemExit(f"{flag} needs 0 <= MIN <= MAX, got {text!r}")
    return pair


def cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from dataclasses import replace
    from pathlib import Path

    from genserve.service.benchmarks.loadtest import (
        SLO,
        WorkloadSpec,
        completed_requests,
        format_priority_comparison,
        format_summary,
        format_target_comparison,
        plot,
        priority_comparison,
        replica_shares,
        run_load,
        summarize,
        target_comparison,
    )

    spec = WorkloadSpec(
        num_requests=args.num_requests,
        arrival=args.arrival,
        rate=args.rate,
        concurrency=args.concurrency,
        prompt_words=_range(args.prompt_words, "--prompt-words"),
        max_new_tokens=_range(args.max_new_tokens, "--max-new-tokens"),
        prompt_mode=args.prompt_mode,
        batch_fraction=args.batch_fraction,
        jsonl=args.jsonl,
        seed=args.seed,
        long_prompt_fraction=args.long_prompt_fraction,
        long_prompt_words=args.long_prompt_words,
    )
    slo = SLO(args.slo_ttft, args.slo_itl)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [None]
    metrics_urls = [url for url in args.replica_metrics.split(",") if url]
    reports = []
    for rate in rates:
        run_spec = replace(spec, rate=rate, arrival="poisson") if rate is not None else spec
        before = [completed_requests(url) for url in metrics_urls]
        records, seconds = asyncio.run(run_load(args.target, run_spec, lb_policy=args.lb_policy))
        report = summarize(records, seconds, slo)
        if metrics_urls:
            report["replicas"] = replica_shares(metrics_urls, before, [completed_requests(u) for u in metrics_urls])
            print("requests per replica: " + ", ".join(f"{r['replica']} {r['share']:.0%}" for r in report["replicas"]))
        reports.append((rate, report))
        print((f"offered load {rate:g} req/s\n" if rate is not None else "") + format_summary(report))
    comparison = None
    if args.compare_priorities:
        records, seconds = asyncio.run(run_load(args.target, replace(spec, ignore_priorities=True)))
        without = summarize(records, seconds, slo)
        comparison = priority_comparison(reports[0][1], without)
        print(format_priority_comparison(comparison))
    against = []
    if args.compare_target:
        for rate, report in reports:
            run_spec = replace(spec, rate=rate, arrival="poisson") if rate is not None else spec
            records, seconds = asyncio.run(run_load(args.compare_target, run_spec))
            rows = target_comparison(report, summarize(records, seconds, slo))
            against.append({"offered_rate": rate, "rows": rows})
            heading = f"offered load {rate:g} req/s: " if rate is not None else ""
            print(f"{heading}{args.target} against {args.compare_target}, the same requests")
            print(format_target_comparison(rows, (args.target, args.compare_target)))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    result = {
        "target_comparison": against or None,
        "priority_comparison": comparison,
        "target": args.target,
        "workload": vars(args) | {"handler": None},
        "runs": [{"offered_rate": rate, **{k: v for k, v in report.items() if k != "raw"}} for rate, report in reports],
    }
    (output / "loadtest.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    for path in plot(reports, output):
        print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {output / 'loadtest.json'}", file=sys.stderr)
    return 0 if all(set(r["codes"]) <= {"OK"} for _, r in reports) else 1


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=_env("target", "localhost:50051"), help="server address host:port")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="> 0 turns sampling on")
    parser.add_argument("--do-sample", action="store_true", help="sample even at the default temperature")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--prompt-lookup", type=int, help="speculative decoding: N tokens proposed by prompt lookup")
    parser.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance scale (> 1 steers away from --negative-prompt)"
    )
    parser.add_argument("--negative-prompt", help="guidance's negative prompt (default: the prompt's last token)")
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument("--regex", help="the output full-matches this regular expression")
    constraint.add_argument("--json-schema", help="the output is JSON valid against this schema (a file or JSON text)")
    constraint.add_argument("--choice", action="append", help="the output is one of these strings (repeatable)")
    constraint.add_argument("--grammar", help="the output follows this Lark/GBNF grammar (a file or the text)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Text generation with continuous batching and the exact semantics of transformers' generate().",
    )
    commands = parser.add_subparsers(dest="command", required=True)

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
        "--baselines",
        default="sequential,static,continuous",
        help="comma-separated subset of: sequential, static, continuous, slots (genserve with a KV slot per row, "
        "against --kv-cache-memory's paged cache), llama.cpp (llama-server on the model's GGUF, as shipped and "
        "requantized to F32, against genserve over gRPC; see the llama.cpp options)",
    )
    llama = bench.add_argument_group("llama.cpp", "the llama.cpp baseline's workload: all requests sent at once")
    llama.add_argument("--llama-server", help="path to llama-server (default: on PATH); llama-quantize beside it")
    llama.add_argument("--parallel", type=int, default=16, help="requests, llama-server slots and genserve rows")
    llama.add_argument("--prompt-tokens", type=int, default=80, help="tokens per prompt")
    llama.add_argument("--new-tokens", type=int, default=96, help="tokens generated per request (eos ignored)")
    llama.add_argument("--threads", type=int, default=0, help="llama-server threads (0: every core)")
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
    decode = bench.add_argument_group(
        "decode latency", "one engine decode step per batch size against the memory-bandwidth floor"
    )
    decode.add_argument("--decode-latency", action="store_true", help="measure and print the table")
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
    bench.set_defaults(handler=cmd_bench)

    serve = commands.add_parser(
        "serve",
        help="serve a model over gRPC",
        description="Loads the model, warms it up, then serves genserve.v1.TextGeneration, grpc.health.v1 and "
        "server reflection. SIGTERM drains: health turns NOT_SERVING, new requests are refused and running ones "
        "finish within --drain-seconds. Every flag also reads GENSERVE_<FLAG> from the environment.",
    )
    add_model_arguments(serve)
    add_engine_arguments(serve)
    add_feature_arguments(serve)
    serve.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind (0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=int(_env("port", "50051")))
    serve.add_argument(
        "--metrics-port", type=int, default=int(_env("metrics_port", "9464")), help="Prometheus /metrics port"
    )
    serve.add_argument(
        "--stream-retention-seconds",
        type=float,
        default=float(_env("stream_retention_seconds", "60")),
        help="how long a resumable stream's output is kept for its client to resume it",
    )
    serve.add_argument(
        "--drain-seconds", type=float, default=float(_env("drain_seconds", "30")), help="grace period on SIGTERM"
    )
    custom = serve.add_argument_group("custom components (requests enable them by name, with JSON arguments)")
    custom.add_argument(
        "--logits-processor",
        action="append",
        default=[],
        metavar="NAME=module:Class",
        help="register an HF-compatible LogitsProcessor class (repeatable)",
    )
    custom.add_argument(
        "--stopping-criteria",
        action="append",
        default=[],
        metavar="NAME=module:Class",
        help="register an HF-compatible StoppingCriteria class (repeatable)",
    )
    security = serve.add_argument_group("security")
    security.add_argument("--tls-cert", default=_env("tls_cert", ""), help="PEM certificate chain: serve TLS")
    security.add_argument("--tls-key", default=_env("tls_key", ""), help="PEM private key for --tls-cert")
    security.add_argument(
        "--tls-client-ca", default=_env("tls_client_ca", ""), help="PEM CA: require client certificates (mutual TLS)"
    )
    security.add_argument(
        "--auth-token-file",
        default=_env("auth_token_file", ""),
        help="accepted bearer tokens, one per line; calls without one get UNAUTHENTICATED (health stays open)",
    )
    security.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(_env("max_message_bytes", str(4 * 1024 * 1024))),
        help="largest request or response message",
    )
    serve.add_argument(
        "--log-format", default=_env("log_format", "json"), choices=["json", "text"], help="log lines as JSON or text"
    )
    serve.set_defaults(handler=cmd_serve)

    generate = commands.add_parser("generate", help="one generation from a running server")
    generate.add_argument("prompt", help="the prompt text (sent as is, no chat template)")
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    _add_client_arguments(generate)
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="interactive streaming chat with a running server (chat template applied)")
    chat.add_argument("--system", default="", help="a system message to start the conversation with")
    _add_client_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    load = commands.add_parser(
        "loadtest",
        help="seeded load against a running server: latency percentiles, goodput, plots",
        description="Sends a seeded workload of streaming requests and reports throughput, time to first token, "
        "inter-token latency and end-to-end latency (p50/p90/p99), errors by gRPC code, and goodput under the "
        "SLOs. Writes loadtest.json and PNG plots (latency CDFs; with --rates, throughput and TTFT against "
        "offered load) to --output. Exits 1 if any request failed.",
    )
    load.add_argument(
        "--target",
        default=_env("target", "localhost:50051"),
        help="host:port, or several comma-separated (balanced by --lb-policy), or a proxy in front of replicas",
    )
    load.add_argument(
        "--lb-policy",
        choices=["round_robin", "weighted_round_robin", "pick_first"],
        default="round_robin",
        help="how the client balances several targets; weighted_round_robin follows the replicas' ORCA reports",
    )
    load.add_argument(
        "--replica-metrics",
        default="",
        help="comma-separated /metrics URLs of the replicas: the report gives each one's share of the requests",
    )
    load.add_argument("--num-requests", type=int, default=100)
    load.add_argument("--arrival", choices=["poisson", "burst", "closed"], default="poisson")
    load.add_argument("--rate", type=float, default=4.0, help="requests/s for poisson arrivals")
    load.add_argument("--rates", default="", help="comma-separated rates: one poisson run each (a load sweep)")
    load.add_argument("--concurrency", type=int, default=8, help="clients for --arrival closed")
    load.add_argument("--prompt-words", default="8,64", help="MIN,MAX words per synthetic prompt")
    load.add_argument("--max-new-tokens", default="16,128", help="MIN,MAX max_new_tokens per request")
    load.add_argument("--prompt-mode", choices=["text", "ids"], default="text", help="ids: random token ids")
    load.add_argument("--jsonl", help='prompts from a file: one {"prompt": ..., "max_new_tokens": ...} per line')
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--long-prompt-fraction",
        type=float,
        default=0.0,
        help="share of synthetic prompts that are long (--long-prompt-words words), to see their prefill's effect",
    )
    load.add_argument("--long-prompt-words", type=int, default=1200, help="words in a long synthetic prompt")
    load.add_argument(
        "--compare-target",
        help="after the runs, send the same requests to this server too (e.g. one started with other flags) and "
        "print each latency percentile of both and their ratio",
    )
    load.add_argument("--batch-fraction", type=float, default=0.0, help="share of requests sent with priority BATCH")
    load.add_argument(
        "--compare-priorities",
        action="store_true",
        help="run the workload again with every request INTERACTIVE and report the interactive TTFT ratio",
    )
    load.add_argument("--slo-ttft", type=float, default=2.0, help="seconds; goodput counts requests within both SLOs")
    load.add_argument("--slo-itl", type=float, default=0.5, help="seconds, on each request's median token gap")
    load.add_argument("--output", default="loadtest-results", help="folder for loadtest.json and the plots")
    load.set_defaults(handler=cmd_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from genserve.service.ops.logs import configure_logging

    configure_logging(os.environ.get("GENSERVE_LOG_LEVEL", "INFO"), getattr(args, "log_format", "text"))
    try:
        return args.handler(args)
    except ValueError as error:
        from genserve.scheduler.model.architectures import (
            UnsupportedModelError,  # here only: client commands stay free of torch
        )

        if not isinstance(error, UnsupportedModelError):
            raise
        # At start-up, before any request: say what and why, and exit non-zero.
        print(f"genserve: cannot serve this model: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
