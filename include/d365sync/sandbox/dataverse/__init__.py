"""d365sync.sandbox.dataverse."""
