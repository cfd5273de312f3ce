"""Which steps of a two-pass method are sharpness-aware: every one (the default), every k-th, or
each with probability p; the others are plain base steps at one pass.

Periodic SAM is MosaicML Composer's ``SAM(interval=k)``; stochastic SAM is SS-SAM (Zhao, Zhang &
Hu, "SS-SAM: Stochastic Scheduled Sharpness-Aware Minimization for Efficiently Training Deep
Neural Networks", arXiv 2022), a Bernoulli trial per step. With ``every = k`` and ``prob = p``,
step ``t`` (counted from 0 over all steps) is sharpness-aware iff::

    t mod k == 0   and   u_t < p,     u_t = Random(seed, t) ~ U[0, 1)

so the expected cost is ``1 + p/k`` passes per step for a two-pass method. ``u_t`` is a function
of ``(seed, t)`` alone: every DDP rank draws the same decision without communicating, and a
resumed run draws the same decisions as an uninterrupted one (the step counter is optimizer
state). The decision is made on the host from python ints: no device sync.

On a plain step the method does nothing of its own: its state (FriendlySAM's gradient EMA, a
sparse mask's refresh count, X-SAM's and A²SAM's refresh counters) advances on its
sharpness-aware steps only.
"""
from __future__ import annotations

import random


class SharpnessSchedule:
    """``every`` (int >= 1), ``prob`` (float in (0, 1]) and ``seed`` of the rule above."""

    def __init__(self, every: int = 1, prob: float = 1.0, seed: int = 0):
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise ValueError(f"sam_every must be an integer >= 1 (1: every step is "
                             f"sharpness-aware), got {every!r}")
        if not 0.0 < float(prob) <= 1.0:
            raise ValueError(f"sam_prob must be in (0, 1] (1: no random skipping), got {prob!r}")
        self.every, self.prob, self.seed = int(every), float(prob), int(seed)

    @property
    def active(self) -> bool:
        """Whether some steps are plain (otherwise the schedule is never consulted)."""
        return self.every != 1 or self.prob != 1.0

    @property
    def expected_fraction(self) -> float:
        """Expected fraction of sharpness-aware steps, ``p / k``."""
        return self.prob / self.every

    def is_due(self, t: int) -> bool:
        """Whether step ``t`` is sharpness-aware (a pure function of ``t``)."""
        if t % self.every:
            return False
        return self.prob >= 1.0 or random.Random(self.seed * 1_000_003 + t).random() < self.prob

    def due(self, method_state: dict) -> bool:
        """Decide the coming step and advance the step counter kept in ``method_state``
        (``schedule_step``; checkpointed with the optimizer)."""
        t = int(method_state.get("schedule_step", 0))
        method_state["schedule_step"] = t + 1
        return self.is_due(t)

    def __repr__(self) -> str:
        return f"SharpnessSchedule(every={self.every}, prob={self.prob}, seed={self.seed})"
