"""pallax.sharding (see the project issues for its scope)."""
