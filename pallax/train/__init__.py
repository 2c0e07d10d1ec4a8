"""pallax.train (see the project issues for its scope)."""
