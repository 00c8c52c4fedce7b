"""d365sync.dynamics."""
