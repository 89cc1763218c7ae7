"""Several trials on one GPU: which trial may start on which device, from estimated memory.

No torch here: the devices (an id as CUDA_VISIBLE_DEVICES names it, and its memory) and each
trial's estimated peak (``run.estimates``, the estimator's ``total_bytes``: it includes a CUDA
context per process) come in as numbers, so the rules are tested with simulated devices.

Rules (``Packer``):

- memory mode (``--jobs auto`` on GPUs): a trial starts on the device with the most free
  memory where the estimates of what runs there plus its own, each grown by the margin, fit
  the device's memory; a trial without an estimate, or one that would not fit an empty device,
  runs alone on an empty device (an estimate is not a promise: let it try, never wait forever);
- count mode (``--per-gpu N``): up to N trials per device whatever the estimates say;
- a trial marked ``alone`` (one that ran out of memory beside others) waits for an empty device
  and keeps it to itself while it runs;
- the queue is taken in plan order, but a later trial that fits may start while an earlier one
  waits for room (each trial's numbers do not depend on when it runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_MARGIN = 0.10  # the estimator's held-out error on published peaks stays within 10 %


@dataclass
class Device:
    """One GPU: its CUDA_VISIBLE_DEVICES id and total memory in bytes."""

    id: str
    capacity: float
    running: dict[str, float] = field(default_factory=dict)  # trial id -> reserved bytes
    exclusive: bool = False  # a trial that must run alone holds it

    @property
    def used(self) -> float:
        return sum(self.running.values())


class Packer:
    """Places trials on devices; ``place`` and ``release`` as trials start and end."""

    def __init__(self, devices: list[Device], *, per_gpu: int | None = None,
                 margin: float = DEFAULT_MARGIN) -> None:  # fmt: skip
        if not devices:
            raise ValueError("packing needs at least one device")
        if per_gpu is not None and per_gpu < 1:
            raise ValueError(f"--per-gpu: must be >= 1, got {per_gpu}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.devices = devices
        self.per_gpu = per_gpu
        self.margin = margin
        self.where: dict[str, Device] = {}

    def need(self, estimate: float | None) -> float | None:
        """Bytes a trial reserves: its estimate grown by the margin (None: unknown)."""
        if estimate is None or not math.isfinite(estimate) or estimate <= 0:
            return None
        return estimate * (1 + self.margin)

    def place(self, trial_id: str, estimate: float | None, alone: bool = False) -> str | None:
        """The device id the trial starts on now, or None when it must wait."""
        need = self.need(estimate)
        empty = [d for d in self.devices if not d.running]
        if alone or (self.per_gpu is None and (need is None or not self._fits_any(need))):
            if not empty:
                return None
            dev = max(empty, key=lambda d: d.capacity)
            dev.exclusive = True
            return self._take(dev, trial_id, need or dev.capacity)
        open_ = [d for d in self.devices if not d.exclusive]
        if self.per_gpu is not None:
            fits = [d for d in open_ if len(d.running) < self.per_gpu]
            # the least busy device, then the most free memory
            key = lambda d: (-len(d.running), d.capacity - d.used)  # noqa: E731
        else:
            fits = [d for d in open_ if d.used + need <= d.capacity]
            key = lambda d: d.capacity - d.used  # noqa: E731
        if not fits:
            return None
        return self._take(max(fits, key=key), trial_id, need or 0.0)

    def release(self, trial_id: str) -> None:
        dev = self.where.pop(trial_id)
        del dev.running[trial_id]
        if not dev.running:
            dev.exclusive = False

    def _fits_any(self, need: float) -> bool:
        return any(need <= d.capacity for d in self.devices)

    def _take(self, dev: Device, trial_id: str, need: float) -> str:
        dev.running[trial_id] = need
        self.where[trial_id] = dev
        return dev.id

    @property
    def slots(self) -> int:
        """At most this many trials run at once (the progress display's width)."""
        if self.per_gpu is not None:
            return self.per_gpu * len(self.devices)
        return max(1, len(self.devices))  # grows as trials fit; shown as "auto"


def check_jobs(jobs: int | str, per_gpu: int | None) -> None:
    """``--jobs`` (a positive integer or ``auto``) and ``--per-gpu`` (positive, alone or with
    ``auto``), one line naming the option; the backends' constructors call it."""
    if jobs != "auto" and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs: must be >= 1 or auto, got {jobs}")
    if per_gpu is not None and jobs not in (1, "auto"):
        raise ValueError(f"--per-gpu: sets the trials per GPU; leave --jobs out (got {jobs})")
    if per_gpu is not None and per_gpu < 1:
        raise ValueError(f"--per-gpu: must be >= 1, got {per_gpu}")


def gpu_fraction(estimate: float | None, capacity: float, *, per_gpu: int | None = None,
                 margin: float = DEFAULT_MARGIN) -> float:  # fmt: skip
    """The share of one GPU a Ray task asks for: ``1 / per_gpu``, else its estimate grown by
    the margin over the GPU's memory, rounded up to a hundredth; a whole GPU without an
    estimate or when it would not fit one."""
    if per_gpu is not None:
        return 1.0 / per_gpu
    need = Packer([Device("0", capacity)], margin=margin).need(estimate)
    if need is None or need >= capacity:
        return 1.0
    return min(1.0, math.ceil(round(100 * need / capacity, 9)) / 100)  # 1.1 is 1.10000000000001
