"""Demo data steward: tidy a freshly seeded ERP (see ``d365sync.sandbox.erp.seeder.tidy``).

Usage: ``python scripts/demo_tidy_erp.py "<ODBC connection string>"``.
"""

from __future__ import annotations

import sys

from d365sync.erp import ErpClient
from d365sync.sandbox.erp.seeder import tidy


def main(conn_str: str) -> int:
    with ErpClient(conn_str) as client:
        tidy(client)
    print("ERP tidied: blank names, unknown currencies, negative stock fixed (bad e-mails, duplicates kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
