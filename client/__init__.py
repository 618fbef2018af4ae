"""equifed: client."""
