"""The ERP sandbox: a legacy-style schema per dialect and a deterministic dirty-data seeder."""
