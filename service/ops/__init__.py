"""Operating the server: Prometheus metrics, ORCA load reports and retry hints, TLS and token security, JSON
logs. Reads the engine's published snapshots through `genserve.scheduler`; holds no tensors."""
