"""equifed: simulations."""
