"""Black-box teachers: the teacher is only a text generator (local model, HTTP API, or a recording).

- :mod:`~kdistill.blackbox.backends`: :class:`TextTeacher`, :class:`SamplingParams`, :class:`Completion`,
  :class:`LocalTeacher`, :class:`OpenAITeacher`, :class:`Budget` and the errors.
- :mod:`~kdistill.blackbox.replay`: :class:`ReplayTeacher` (SQLite record / replay).
- :mod:`~kdistill.blackbox.serve`: an OpenAI-compatible server over a local model (``serve``,
  :class:`FaultPlan`), imported on demand.
"""

from kdistill.blackbox.backends import (
    BlackBoxError,
    Budget,
    BudgetExhausted,
    Completion,
    LocalTeacher,
    OpenAITeacher,
    SamplingParams,
    TextTeacher,
)
from kdistill.blackbox.replay import ReplayTeacher, request_key

__all__ = [
    "BlackBoxError",
    "Budget",
    "BudgetExhausted",
    "Completion",
    "LocalTeacher",
    "OpenAITeacher",
    "ReplayTeacher",
    "SamplingParams",
    "TextTeacher",
    "request_key",
]
