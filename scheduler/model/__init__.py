"""The model step: loading (default GGUF, local folders, dummy weights), which architectures are served, the
attention masks, CPU kernels, CUDA-graph decode passes, the persistent batch and the runner that executes a
plan. Imports the core, the KV room and the features; never the engine loop or the front ends."""
