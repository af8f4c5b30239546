"""The engine's decisions, free of torch: requests and their parameters, the waiting queue, the scheduler, the KV
block bookkeeping it counts with, a step as data (the plan) and what the engine publishes. Imports nothing else
of genserve; an import-linter contract keeps torch and transformers out."""
