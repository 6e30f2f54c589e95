"""One error type for requests we refuse, so every plane answers bad input the same way (status + field)."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from pydantic import BaseModel, Field


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


class ErrorDetail(BaseModel):
    message: str = Field(description="what is wrong, for a person; starts with the field's name when one is to blame")
    field: str | None = Field(None, description="the request field, header or id to blame, when there is one")
    code: int = Field(description="the HTTP status, repeated for clients that only keep the body")
    type: str = Field(description="the status's name, e.g. BadRequest (vLLM's own errors use the same key)")


class ErrorBody(BaseModel):
    """The one JSON shape of every error reply we send, on the inference servers and the API alike:
    ``{"error": {"message", "field", "code", "type"}}``, the shape vLLM's (and OpenAI's) own errors
    have, so one parser reads ours and vLLM's. (A *failed Tinker future* is a result, not an error
    reply: its ``{"error": "<message>", "category"}`` is the SDK's wire format and stays so.)"""

    error: ErrorDetail

    @classmethod
    def of(cls, status: int, message: str, field: str | None = None) -> ErrorBody:
        try:
            kind = HTTPStatus(status).phrase.replace(" ", "")
        except ValueError:
            kind = "Error"
        return cls(error=ErrorDetail(message=message, field=field, code=status, type=kind))

    @classmethod
    def of_error(cls, exc: SkyrlError) -> ErrorBody:
        return cls.of(exc.status, exc.message, exc.field)
