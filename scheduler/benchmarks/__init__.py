"""`genserve bench`: the engine measured against Hugging Face's ways to serve the same workload (throughput), with
and without its features (features), and its decode step against the memory-bandwidth floor (decode_latency).
Serving never imports this package."""
