"""equifed: core_models."""
