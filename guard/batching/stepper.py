"""What a :class:`~guard.batching.BatchWorker` runs: a :class:`Stepper`, or a batch function
seen as a stepper whose one step finishes every item."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class Stepper(Protocol[T, R]):
    """Work that advances all its live items by one step per call (one model call, typically).

    ``admit`` adds items under the worker's keys, all or none (raise before adding any);
    ``step`` returns the items finished by it, as (key, result); ``live`` counts admitted items
    not yet returned; ``drop`` forgets some of them (their callers gave up), ``abandon`` all
    (after a failed step). Keys are hashable by identity."""

    @property
    def live(self) -> int: ...

    def admit(self, keys: list[object], items: list[T]) -> None: ...

    def step(self) -> list[tuple[object, R]]: ...

    def drop(self, keys: list[object]) -> None: ...

    def abandon(self) -> None: ...


class WholeBatches(Generic[T, R]):
    """``fn`` as a :class:`Stepper` whose one step finishes everything admitted."""

    def __init__(self, fn: Callable[[list[T]], list[R]], name: str) -> None:
        self._fn = fn
        self._name = name
        self._keys: list[object] = []
        self._items: list[T] = []

    @property
    def live(self) -> int:
        return len(self._items)

    def admit(self, keys: list[object], items: list[T]) -> None:
        self._keys += keys
        self._items += items

    def step(self) -> list[tuple[object, R]]:
        keys, items = self._keys, self._items
        self.abandon()
        results = list(self._fn(items))
        if len(results) != len(items):
            raise ValueError(
                f"batch worker {self._name!r}: fn returned {len(results)} results "
                f"for {len(items)} items"
            )
        return list(zip(keys, results, strict=True))

    def drop(self, keys: list[object]) -> None:
        gone = set(keys)
        kept = [(k, x) for k, x in zip(self._keys, self._items, strict=True) if k not in gone]
        self._keys, self._items = [k for k, _ in kept], [x for _, x in kept]

    def abandon(self) -> None:
        self._keys, self._items = [], []
