"""Where bytes come from: registries, OCI layouts and blob files behind one interface."""

import sys
import types

# httpx imports its optional command-line client (click, rich, pygments) when those happen to
# be installed: a third of a second of every mount and pull.  lazyfs never runs ``httpx``'s
# CLI, so an empty module stands in for it (httpx then defines a stub ``main`` itself).
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", types.ModuleType("httpx._main"))
