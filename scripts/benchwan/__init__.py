"""The WAN benchmark harness behind ``scripts/bench.sh``: one concern per module.

- :mod:`.state`     what this run made (namespace, veth, PIDs, mounts) and idempotent teardown
- :mod:`.netns`     the "registry host" network namespace, the veth pair and tbf shaping
- :mod:`.relay`     a small delaying TCP relay (stdlib only; runs inside the namespace)
- :mod:`.registry`  docker-registry and the relay in the namespace, pushing, profile checks
- :mod:`.images`    reproducible test images (synthetic trees, a Debian rootfs), cached
- :mod:`.scenarios` startup / read / walk / mount, every contender alternating in one run
- :mod:`.report`    result JSON, the BENCHMARKS.md section and PNG charts
"""
