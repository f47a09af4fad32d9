"""The `cotap` command: parses arguments and calls the wings lazily (so `cotap embed` never loads torch)."""
