"""What every benchmark does with its result: print it as JSON, and keep a copy if asked."""
from __future__ import annotations

import json


def emit(result: dict, out: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0
