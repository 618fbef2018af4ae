"""equifed: fairness."""
