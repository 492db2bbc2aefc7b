"""Error types shared by every kronsearch package.

`UserError` (and its subclasses) mean "the input was wrong": the CLI prints its one-line message and exits
with status 2. Anything else reaching the CLI is an internal error (status 1).
"""


class UserError(ValueError):
    """Bad input from the user: a config, a plan, a path, a model name. The message names the problem."""


class ShapeError(UserError):
    """A factor shape that does not divide the matrix it is meant for."""


class PlanError(UserError):
    """A compression plan that does not fit a model (unknown module, bad shape, unsupported type)."""


class ConfigError(UserError):
    """A trial or search configuration with an unknown key, a wrong type or an impossible value."""


class DataError(UserError):
    """A data source that is missing, empty or in an unexpected layout."""


class CheckpointError(UserError):
    """A saved model or results file that is missing, truncated or corrupt."""
