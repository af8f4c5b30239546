"""KV memory on the device: the slot cache (a row per request), the paged cache (a pool of blocks read through
block tables) and the prefix cache. Imports the core; never the features, the model step or the engine loop."""
