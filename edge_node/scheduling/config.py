"""The scheduling section of the node config: windows, load policy, grace.

Strict like the rest of our config (unknown keys rejected). The node embeds
:class:`ScheduleConfig` as ``scheduling``; the cloud may replace its
``timezone`` and ``windows`` at run time (see docs/scheduling.md).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud_sync.windows import TrainingWindow, zone


class LoadPolicy(BaseModel):
    """Time division by load, per card, with hysteresis so training does not flap.

    Inference is *busy* once its load (0..1, from ``inference_load(card)``) has
    stayed at or above ``busy_above`` for ``busy_for_s``; it is *idle* once the
    load has stayed at or below ``idle_below`` for ``idle_for_s``. Busy preempts
    training (also inside a window that yields to inference); idle lets training
    start outside any window with ``idle_fraction`` of the card. Between the two
    marks nothing changes.
    """

    model_config = ConfigDict(extra="forbid")
    #: train outside the windows when inference is idle
    train_when_idle: bool = True
    idle_fraction: float = Field(default=0.5, gt=0, le=1)
    idle_below: float = Field(default=0.2, ge=0, le=1)
    idle_for_s: float = Field(default=60.0, ge=0)
    busy_above: float = Field(default=0.6, ge=0, le=1)
    busy_for_s: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _marks(self) -> LoadPolicy:
        if self.idle_below >= self.busy_above:
            raise ValueError(f"idle_below ({self.idle_below}) must be below busy_above "
                             f"({self.busy_above}): the gap between them is the hysteresis")
        return self


class ScheduleConfig(BaseModel):
    """``scheduling`` in the node config."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    #: IANA time zone of the windows (e.g. "Asia/Shanghai"); none = system local
    timezone: str | None = None
    windows: list[TrainingWindow] = Field(default_factory=list)
    load: LoadPolicy = Field(default_factory=LoadPolicy)
    #: seconds a job has to checkpoint and exit after SIGTERM before SIGKILL
    grace_s: float = Field(default=30.0, gt=0, le=600)
    #: seconds between scheduling passes (load samples, exits, window checks)
    tick_s: float = Field(default=1.0, gt=0, le=60)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        zone(v)
        return v
