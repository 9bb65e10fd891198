"""``python -m tests.support.faultyops FLAGFILE lazyfs-args…``: the lazyfs CLI with FUSE
operations that raise RuntimeError in the handler named in FLAGFILE (read on every call;
empty or absent: none).  The raise happens inside the handler, so it meets the same guard an
unexpected bug would."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lazyfs.fs.serve
from lazyfs.cli import main
from lazyfs.fs.ops import HANDLERS, Operations

FLAG = Path(sys.argv[1]) if __name__ == "__main__" else Path("/nonexistent")


def _armed() -> str:
    try:
        return FLAG.read_text().strip()
    except FileNotFoundError:
        return ""


def _faulty(name: str) -> Any:
    async def handler(self: Operations, *args: Any) -> Any:
        if _armed() == name:
            raise RuntimeError(f"injected into {name}")
        return await getattr(super(FaultyOperations, self), name)(*args)

    handler.__name__ = name
    return handler


# type(): the handlers must be in the class body for Operations' guard to wrap them.
FaultyOperations = type("FaultyOperations", (Operations,), {n: _faulty(n) for n in HANDLERS})

if __name__ == "__main__":
    vars(lazyfs.fs.serve)["Operations"] = FaultyOperations  # what serve() instantiates
    sys.exit(main(sys.argv[2:]))
