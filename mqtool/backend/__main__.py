"""`python -m mqtool.backend`: print the supported-op list for docs/backend.md."""

from mqtool.backend.ops import supported_ops_markdown

print(supported_ops_markdown(), end="")
