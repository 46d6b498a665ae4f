"""Per-paper evaluation tasks (data loaders and checkers), kept out of the method modules."""
