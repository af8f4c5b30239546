"""A soak run of mixed traffic: resident memory flat after warm-up, no growth in threads or open streams.

GENSERVE_SOAK_SECONDS sets the length (60 s by default in `make test`; the README figures come from longer runs).
"""

from __future__ import annotations

import os
import random
import threading
import time

import grpc

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import TINY_VOCAB
from tests.serving import ServerThread

SOAK_SECONDS = float(os.environ.get("GENSERVE_SOAK_SECONDS", "60"))


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _client(server: ServerThread, seed: int, stop: threading.Event, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        prompt = [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 80))]
        parameters = pb.GenerationParameters(max_new_tokens=rng.randint(1, 60))
        if rng.random() < 0.3:
            parameters.do_sample, parameters.temperature, parameters.top_p = True, 0.8, 0.9
        if rng.random() < 0.2:
            parameters.repetition_penalty, parameters.no_repeat_ngram_size = 1.2, 3
        request = pb.GenerateRequest(input_ids=pb.TokenIds(ids=prompt), parameters=parameters)
        kind = rng.random()
        try:
            if kind < 0.4:
                server.stub.Generate(request, timeout=30)
            elif kind < 0.8:
                list(server.stub.GenerateStream(request, timeout=30))
            elif kind < 0.9:
                stream = server.stub.GenerateStream(request)
                next(stream, None)
                stream.cancel()
                counts["cancelled"] += 1
                continue
            else:
                request.parameters.top_p = 7.0  # invalid on purpose
                server.stub.Generate(request, timeout=30)
            counts["ok"] += 1
        except grpc.RpcError as error:
            key = "invalid" if error.code() == grpc.StatusCode.INVALID_ARGUMENT else f"failed:{error.code().name}"
            counts[key] = counts.get(key, 0) + 1


def test_soak_memory_threads_and_streams_stay_flat(tiny) -> None:
    server = ServerThread(tiny, max_running=8, max_queue=256)
    counts = {"ok": 0, "cancelled": 0, "invalid": 0}
    stop = threading.Event()
    clients = [threading.Thread(target=_client, args=(server, i, stop, counts), daemon=True) for i in range(12)]
    try:
        for client in clients:
            client.start()
        time.sleep(SOAK_SECONDS * 0.25)  # warm-up: allocator pools, caches and KV capacity reach their size
        rss_after_warmup, threads_after_warmup = _rss_mb(), threading.active_count()
        samples = []
        end = time.monotonic() + SOAK_SECONDS * 0.75
        while time.monotonic() < end:
            time.sleep(1)
            samples.append(_rss_mb())
        stop.set()
        for client in clients:
            client.join(timeout=60)
        deadline = time.monotonic() + 30
        while (server.engine.num_running or server.engine.num_waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        growth = max(samples) - rss_after_warmup
        threads_now = threading.active_count()
        print(
            f"\nsoak {SOAK_SECONDS:.0f}s: {counts}, rss after warm-up {rss_after_warmup:.0f} MB, "
            f"max later {max(samples):.0f} MB, threads {threads_after_warmup} -> {threads_now}"
        )
        assert not [k for k in counts if k.startswith("failed")], counts
        assert counts["ok"] > 50 and counts["cancelled"] > 5 and counts["invalid"] > 5
        assert growth < 48, f"resident memory grew {growth:.0f} MB after warm-up"
        # The server's own threads, without the clients' (alive at the warm-up count, joined since).
        assert not any(client.is_alive() for client in clients)
        assert threads_now <= threads_after_warmup - len(clients)
        assert server.engine.num_running == 0 and server.engine.num_waiting == 0
        assert not server.server.service.in_flight and server.server.async_engine.num_streams == 0
        assert server.engine.runner.kv_usage_ratio() == 0.0
    finally:
        stop.set()
        server.close()
