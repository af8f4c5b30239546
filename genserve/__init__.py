"""genserve: Hugging Face `model.generate()` turned into a shared gRPC service.

The repository keeps its rooms at the top (`scheduler/`, `service/`, `proto/`); pyproject.toml's package-dir
installs them under this one name:

- `genserve.scheduler`: the engine. Continuous batching, KV caches, per-row features, the model step. Free of
  gRPC and HTTP. Its package (`genserve.scheduler`) is the narrow, torch-free face the front ends use.
- `genserve.service`: the front ends. The gRPC protocols, operations (metrics, load reports, security, logs),
  the server's assembly and the `genserve` command. Free of tensors.
"""

__version__ = "0.1.0"
