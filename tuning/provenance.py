"""Where a tuned value came from: recorded beside it in pipeline.json, shown by `Retriever.describe()`."""
from __future__ import annotations

import shlex
import sys
import time
from typing import Any, Sequence


def provenance(module: str, argv: Sequence[str] | None, replaced: dict[str, Any]) -> dict[str, Any]:
    """The command that fitted the values, when, and what it replaced (the recipe's or an older fit's)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {"command": f"python -m {module} " + shlex.join(args), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime()),
            "replaced": replaced}
