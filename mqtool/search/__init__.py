"""The search: MetaQuantNet trained once, a genetic search per budget, finetuning of the winner.

Public API: `search_policies` (what `mqtool search` runs), `search_and_finetune` (what `mqtool convert
--target-*` runs), `SearchConfig`, `Budget`, `parse_budgets`, `default_workdir`.
"""

from mqtool.search.api import default_workdir, search_and_finetune, search_policies, write_search_outputs
from mqtool.search.budgets import Budget, parse_budgets
from mqtool.search.config import SearchConfig

__all__ = [
    "Budget",
    "SearchConfig",
    "default_workdir",
    "parse_budgets",
    "search_and_finetune",
    "search_policies",
    "write_search_outputs",
]
