"""The types Iris's client pickles (same module path and field names as Iris's)."""

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass
class Entrypoint:
    """A callable with its arguments: what `serialized_entrypoint` carries."""

    callable: Callable[..., Any]
    args: tuple = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_callable(cls, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "Entrypoint":
        return cls(callable=fn, args=args, kwargs=kwargs)
