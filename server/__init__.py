"""equifed: server."""
