"""Error types that the CLI maps to exit codes.

`InputError` is the user's fault (bad file, bad option, infeasible budget): exit 2, one line.
Anything else is ours: exit 1 with a hint to re-run with --debug.
"""


class InputError(Exception):
    """Bad input or usage. The message is one line naming the file/node/field and the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
