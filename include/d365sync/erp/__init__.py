"""d365sync.erp."""
