"""One error type for requests we refuse, so every plane answers bad input the same way (status + field)."""

from __future__ import annotations

from collections.abc import Iterable


class SkyrlError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status to answer with, ``field`` the culprit."""

    def __init__(self, status: int, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field_name

    def __reduce__(self) -> tuple[type[SkyrlError], tuple[int, str, str | None]]:  # Ray pickles it across processes
        return (type(self), (self.status, self.message, self.field))

    def to_dict(self) -> dict[str, object]:
        return {"status": self.status, "message": self.message, "field": self.field}


def check_token_ids(ids: Iterable[int], vocab: int, field: str, error: type[SkyrlError] = SkyrlError) -> None:
    """Refuse token ids the model does not have, naming the field (one rule for every plane)."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise error(400, f"{field}: token id {bad} is outside the vocabulary [0, {vocab})", field)
