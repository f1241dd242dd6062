"""A minimal stateful object for tests: what an optimizer or a scheduler looks like to shardckpt."""

from __future__ import annotations


class Holder:
    """Anything with ``state_dict`` / ``load_state_dict``; entries saved under it that its
    ``state_dict`` lacks are created on load."""

    def __init__(self, state: dict[str, object]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, object]:
        return self.state

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.state = state
