"""d365sync.airflow."""
