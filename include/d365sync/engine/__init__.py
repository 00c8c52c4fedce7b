"""d365sync.engine."""
