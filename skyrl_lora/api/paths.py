"""``tinker://`` paths and checkpoint kinds: parsed once into types, never matched as strings again.

The SDK's grammar (``tinker.ParsedCheckpointTinkerPath``): ``tinker://<run>/<segment>/<name>`` where
the segment names the kind and the run id has no ``/``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from skyrl_lora.errors import SkyrlError

# a checkpoint's name becomes a directory name: no separators, no "..", nothing hidden
CHECKPOINT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class CheckpointKind(enum.StrEnum):
    """What a checkpoint holds. The values are the SDK's ``checkpoint_type`` values."""

    TRAINING = "training"  # weights and optimizer state (save_state), for load_state
    SAMPLER = "sampler"  # a peft adapter the inference servers load (save_weights_for_sampler)
    EXTERNAL = "external"  # a peft adapter for download (save_weights_external)

    @property
    def segment(self) -> str:
        return _SEGMENTS[self]

    @classmethod
    def from_segment(cls, segment: str) -> CheckpointKind | None:
        return next((k for k, s in _SEGMENTS.items() if s == segment), None)


_SEGMENTS = {CheckpointKind.TRAINING: "weights", CheckpointKind.SAMPLER: "sampler_weights",
             CheckpointKind.EXTERNAL: "external_weights"}
_TINKER_PATH = re.compile(r"^tinker://([^/]+)/([a-z_]+)/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: CheckpointKind
    name: str

    @classmethod
    def parse(cls, value: str, field: str = "path") -> TinkerPath:
        """The path's parts, or a 400 naming ``field``."""
        m = _TINKER_PATH.match(value)
        kind = CheckpointKind.from_segment(m.group(2)) if m else None
        if m is None or kind is None:
            raise SkyrlError(400, f"{field}: '{value}' is not tinker://<run>/<weights|sampler_weights|external_weights>"
                                  "/<name>", field)
        return cls(m.group(1), kind, m.group(3))

    @classmethod
    def of(cls, run_id: str, checkpoint_id: str, field: str = "checkpoint_id") -> TinkerPath:
        """From a REST route's run id and ``<segment>/<name>`` checkpoint id."""
        return cls.parse(f"tinker://{run_id}/{checkpoint_id}", field)

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind.segment}/{self.name}"

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.checkpoint_id}"
