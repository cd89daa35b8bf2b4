"""The One-Euro filter (Casiez, Roussel and Vogel, CHI 2012) for jittery tracking signals.

An exponential low-pass whose cutoff rises with the signal's speed: at rest a low cutoff
removes jitter, in fast motion a high cutoff removes lag. Per element of a vector signal:

    alpha(fc, dt) = 1 / (1 + 1 / (2 pi fc dt))
    dx_hat = lowpass(dx / dt, alpha(d_cutoff))            (speed, itself smoothed)
    fc     = min_cutoff + beta * |dx_hat|
    x_hat  = lowpass(x, alpha(fc))
"""
from __future__ import annotations

import math


def _alpha(cutoff, dt: float):
    """Smoothing factor of a first-order low-pass with cutoff frequency ``cutoff`` (Hz) for step ``dt`` (s)."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """One-Euro filter over scalars, numpy arrays or torch tensors (element-wise, duck-typed).

    Args:
        min_cutoff: cutoff (Hz) at rest; lower = smoother and more lag when slow.
        beta: speed coefficient; higher = less lag in fast motion.
        d_cutoff: cutoff (Hz) of the speed estimate.
    Call ``filt(x, t)`` with a timestamp ``t`` in seconds (non-decreasing); the first call returns ``x``.
    """

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        if min_cutoff <= 0 or d_cutoff <= 0:
            raise ValueError("OneEuroFilter: cutoff frequencies must be positive")
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.d_cutoff = float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        """Forget the history (the next call passes its value through)."""
        self._x = None
        self._dx = None
        self._t: float | None = None

    def __call__(self, x, t: float):
        """Filtered value of sample ``x`` (same type and shape) taken at time ``t`` (seconds)."""
        if self._x is None:
            self._x, self._dx, self._t = x, x * 0, float(t)
            return x
        dt = float(t) - self._t
        if dt <= 0:
            # a repeated timestamp adds no information about speed: keep the estimate
            return self._x
        a_d = _alpha(self.d_cutoff, dt)
        dx = (x - self._x) / dt
        self._dx = self._dx + a_d * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * abs(self._dx)
        a = _alpha(cutoff, dt)
        self._x = self._x + a * (x - self._x)
        self._t = float(t)
        return self._x

    @property
    def value(self):
        """The last filtered value (None before the first call)."""
        return self._x
