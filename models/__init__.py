"""Model specs, deterministic local model building and (later) placement."""
