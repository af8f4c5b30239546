"""The engine's core: requests and their parameters, the waiting queue, the scheduler's decisions, a step as data
(the plan), the engine loop and what it publishes. The decision modules (scheduler, waiting queue, plan,
snapshot, parameters) import no torch; the engine loop drives the model room through the runner."""
