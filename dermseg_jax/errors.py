"""The one exception type for problems with the user's input (files, flags, configs, runs).

Every command line shows a `UserError` as one line (`error: ...`, plus `hint: ...` when there is
one) and exits with status 2; anything else is a bug and keeps its traceback. Import-light on
purpose: the data readers raise it without importing absl, JAX or TensorFlow.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; `str(e)` names the file/step and the problem.

    Args:
        message: one line naming the file, flag or step and what is wrong with it.
        hint: optional one line saying how to proceed (name CLI flags, not Python keywords).
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint
