"""KV memory: the slot cache (a row per request), the paged cache (a pool of blocks read through block tables),
the torch-free block bookkeeping the scheduler counts with, and the prefix cache. Imports nothing from the
features or the engine loop."""
