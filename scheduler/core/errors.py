"""The engine's refusals that are not a request's own bad field: a model it cannot serve (at start-up), and the
LoRA adapters a request names. (A request's other errors live where they are raised: `ValidationError` with the
parameters, `QueueFullError` with the waiting queue.)"""


class UnsupportedModelError(ValueError):
    """The model needs something the engine does not serve (raised at start-up, never per request)."""


class AdapterError(ValueError):
    """A LoRA adapter the engine cannot serve: unreadable, made for another base model, a rank above the limit,
    or a PEFT variant that is not plain LoRA. The message says which and why."""


class UnknownAdapterError(LookupError):
    """A request names an adapter the server has not loaded and cannot find."""

    def __init__(self, name: str) -> None:
        super().__init__(f"adapter {name!r} is not loaded on this server")
        self.name = name


class EngineDeadError(RuntimeError):
    """The engine has stopped for good: a tensor-parallel rank died, hung or diverged. Requests end with UNAVAILABLE
    (retry on another replica) and the server exits for its supervisor to restart it."""
