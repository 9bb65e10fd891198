"""Image updates: what a node holding one image must fetch to run another (``report``), and
binary patches between the two published beside the new image (``patch``, ``publish``,
``provider``)."""
