"""The two kinds of failure the CLI knows how to report (exit 2 and exit 1)."""

from __future__ import annotations


class RecipeError(Exception):
    """The recipe or the command line is invalid (exit 2). Each line is one problem."""

    def __init__(self, message: str | list[str]) -> None:
        self.lines = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.lines))


class StageError(Exception):
    """A stage failed for a reason the user can act on (exit 1)."""

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        self.message = message
        super().__init__(f"{stage}: {message}")


class Interrupted(Exception):
    """The run was interrupted (SIGINT/SIGTERM); state and a checkpoint were saved (exit 130)."""
