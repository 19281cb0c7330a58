"""A machine's runtime status: what the supervisor records in ``state.json`` and what the REST API
answers (:class:`vmkit.api.models.RuntimeStatus` is this model, re-exported: one definition).

It lives here, below the API, because the instance records (:mod:`vmkit.host.instance`) read and
write the file; the supervisor changes it field by field as the machine's state moves.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MachineStateName = Literal["stopped", "starting", "running", "pausing", "paused", "resuming", "stopping", "error"]
"""The values of :class:`vmkit.runtime.states.VmState` (a test keeps the two equal)."""


class RuntimeStatus(BaseModel):
    """The machine's runtime status (also recorded in the instance's ``state.json``)."""

    # unknown fields (a newer vmkit's state.json) are ignored; fields change as the machine runs;
    # every field is in every answer (required in the OpenAPI document's responses)
    model_config = ConfigDict(extra="ignore", defer_build=True, json_schema_serialization_defaults_required=True)

    state: MachineStateName = "stopped"
    reason: str = ""
    supervisor_pid: int | None = None
    qemu_pid: int | None = None
    started_at: float | None = None
    accel: str | None = None
    accel_reason: str | None = None
    qemu_version: str | None = None
    degraded: str | None = Field(default=None, description="why the machine runs degraded (a share died)")
    updated_at: float = Field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeStatus:
        return cls.model_validate(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
