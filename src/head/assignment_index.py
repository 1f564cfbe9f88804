"""The head's placements, indexed by node and by model so a pass over 10,000 replicas never scans them all per node."""
from __future__ import annotations

from typing import Iterable

from gridserve.head.state import Assignment

_EMPTY: dict[str, Assignment] = {}


class AssignmentIndex(dict):
    """replica_id -> Assignment (a dict, so the controller reads it as before), plus two indexes kept
    in step on every insert and removal: the assignments of one node, and of one model."""

    def __init__(self, items: Iterable[Assignment] = ()):
        super().__init__()
        self._by_node: dict[str, dict[str, Assignment]] = {}
        self._by_model: dict[str, dict[str, Assignment]] = {}
        self._generations: dict[str, int] = {}  # node -> bumped on every change of its assignments
        self._clock = 0
        for a in items:
            self[a.replica_id] = a

    def __setitem__(self, replica_id: str, a: Assignment) -> None:
        if replica_id in self:
            self._unindex(super().__getitem__(replica_id))
        super().__setitem__(replica_id, a)
        self._by_node.setdefault(a.node_id, {})[replica_id] = a
        self._bump(a.node_id)
        self._by_model.setdefault(a.model, {})[replica_id] = a

    def __delitem__(self, replica_id: str) -> None:
        a = super().__getitem__(replica_id)
        super().__delitem__(replica_id)
        self._unindex(a)

    _missing = object()

    def pop(self, replica_id: str, default=_missing):
        if replica_id not in self:
            if default is AssignmentIndex._missing:
                raise KeyError(replica_id)
            return default
        a = super().pop(replica_id)
        self._unindex(a)
        return a

    def clear(self) -> None:
        super().clear()
        self._by_node.clear()
        self._by_model.clear()

    def _bump(self, node_id: str) -> None:
        self._clock += 1
        self._generations[node_id] = self._clock

    def generation(self, node_id: str) -> int:
        """Changes whenever the node's set of assignments changes (never repeats a value)."""
        return self._generations.get(node_id, 0)

    def generation_now(self) -> int:
        """Changes whenever any assignment changes."""
        return self._clock

    def _unindex(self, a: Assignment) -> None:
        self._bump(a.node_id)
        for index, key in ((self._by_node, a.node_id), (self._by_model, a.model)):
            group = index.get(key)
            if group is not None:
                group.pop(a.replica_id, None)
                if not group:
                    del index[key]

    def of_node(self, node_id: str) -> dict[str, Assignment]:
        """The node's assignments (a live view: copy it before changing the index while iterating)."""
        return self._by_node.get(node_id, _EMPTY)

    def of_model(self, model: str) -> dict[str, Assignment]:
        """The model's assignments (a live view, as of_node)."""
        return self._by_model.get(model, _EMPTY)

    def node_ids(self) -> list[str]:
        return list(self._by_node)
