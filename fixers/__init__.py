"""Repairs for saved adapters, planned before they are applied (`doctor fix`).

`plan(path, options)` returns a `Plan` and writes nothing; `apply(plan, inplace=True)` or
`apply(plan, out=DIR)` carries it out, atomically and with a backup of every replaced file.
"""
from .atomic import FixWriteError
from .context import FixOptions
from .execute import Result, apply
from .plan import Plan
from .planner import plan

__all__ = ["FixOptions", "FixWriteError", "Plan", "Result", "apply", "plan"]
