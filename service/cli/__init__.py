"""The `genserve` command: one module per sub-command, and the shared flags. Client commands never import
torch; `serve` and `bench` load it when they run."""
