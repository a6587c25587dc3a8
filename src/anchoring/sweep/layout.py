"""Names of the files in a shard's directory, shared by the planner, the backends and the worker.

They live apart from `worker` so that importing the package does not import the worker module:
`python -m anchoring.sweep.worker` would otherwise find it already imported and warn.
"""

SHARD_CONFIG = "shard.toml"  # the shard's resolved config
DONE = "done"  # written atomically once the shard's final checkpoints are in place
DIVERGED = "diverged"  # a shard whose training diverged: its message (the shard is not retried, its point not merged)
DIVERGED_EXIT = 3  # a shard worker's exit code when training diverged (not retried: it would diverge again)
