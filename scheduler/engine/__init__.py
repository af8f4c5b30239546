"""The engine loop on top of the rooms below it: `Engine` (one thread: schedule, execute, update, release,
publish), submissions validated on the caller's thread, and `AsyncEngine`, the asyncio face the servers hold
(streams, incremental detokenization, stop strings). Imports core, kv, features and model; nothing imports it
but the package's public face."""
