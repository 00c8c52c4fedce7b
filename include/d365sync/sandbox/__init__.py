"""d365sync.sandbox."""
