"""edgehmoe aggregation server."""
