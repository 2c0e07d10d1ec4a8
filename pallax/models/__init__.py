"""pallax.models (see the project issues for its scope)."""
