"""What StepEvents count since the engine started, so that a reader that sees only some steps (a
panel drawing 10 a second sees ~1 in 50 of a GPU's) still draws exact rates and every request's
time to first token (issue 10): it takes differences of the totals, and the first-token times of
the steps it skipped come merged into the next it gets (EventSubscription._latest)."""

from __future__ import annotations

from operator import itemgetter
from typing import Sequence


class StepTotals:
    """Kept on the step thread (Engine._totals); each step's event reads them."""

    __slots__ = ("computed_tokens", "generated_tokens", "_first_token_seconds")

    def __init__(self) -> None:
        self.computed_tokens = 0   # prompt and decode tokens the steps computed
        self.generated_tokens = 0  # tokens sampled and accepted
        self._first_token_seconds: list[float] = []  # since the last step's event

    def step_computed(self, items: Sequence[tuple[object, int]] | None) -> None:
        """A step's batch (request, tokens it computed) ran; None for a step that failed."""
        if items:
            self.computed_tokens += sum(map(itemgetter(1), items))

    def token_generated(self, first_token_seconds: float | None) -> None:
        """A token was accepted; its request's time to first token if it is the first."""
        self.generated_tokens += 1
        if first_token_seconds is not None:
            self._first_token_seconds.append(first_token_seconds)

    def take_first_token_seconds(self) -> list[float]:
        """The first-token times since the last call, for this step's event."""
        taken, self._first_token_seconds = self._first_token_seconds, []
        return taken
