"""Access traces and prefetch groups: what a workload reads, ranked into what to fetch first."""
