"""Browser tests: headless Debian Chromium against ``airflow standalone`` started by the test."""
