"""The engine's refusal at start-up: a model it cannot serve. (A request's own errors live where they are raised:
`ValidationError` with the parameters, `QueueFullError` with the waiting queue.)"""


class UnsupportedModelError(ValueError):
    """The model needs something the engine does not serve (raised at start-up, never per request)."""
