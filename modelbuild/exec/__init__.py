"""Where a stage runs: devices, the worker process, the local and the Ray executor."""
