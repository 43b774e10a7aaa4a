"""Error types that the CLI maps to exit codes.

`InputError` is the user's fault (bad file, bad option, infeasible budget): exit 2, one line.
Anything else is ours: exit 1 with a hint to re-run with --debug.
"""


class InputError(Exception):
    """Bad input or usage. The message is one line naming the file/node/field and the problem.

    `field` names the library argument or config field at fault (e.g. `space.widths`, `data`) when the
    message starts with it; the CLI then shows the matching flag instead (`--widths`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.field = field
