"""The engine's asyncio face: `AsyncEngine` (submit, stream, cancel from an event loop), incremental
detokenization and stop strings. Imports the core; never the front ends."""
