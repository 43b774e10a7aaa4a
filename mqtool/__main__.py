"""`python -m mqtool ...` (and `torchrun ... -m mqtool ...`) is the `mqtool` command."""

from mqtool.cli import main

main()
