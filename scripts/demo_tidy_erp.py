"""Demo data steward: fix blank customer names, unknown currency codes and negative stock in the seeded ERP.

The seeder makes ~11-12% of CUST_MASTER dirty, above the customers entity's 10% invalid-share
threshold (and ~5% of the products' stock negative, at inventory's 5%), and a run over the
threshold fails by design. Invalid e-mails and duplicates stay, so
the demo still shows quarantine. Usage: ``python scripts/demo_tidy_erp.py "<ODBC connection string>"``.
"""

from __future__ import annotations

import sys

from d365sync.erp import ErpClient

TIDY_SQL = [
    "UPDATE \"CUST_MASTER\" SET \"CUST_NAME\" = 'Customer ' || \"CUST_NO\" "
    "WHERE TRIM(COALESCE(\"CUST_NAME\", '')) = ''",
    "UPDATE \"CUST_MASTER\" SET \"CURR_CODE\" = 'EURO' WHERE \"CURR_CODE\" NOT IN "
    "('STG', 'US$', 'USD', 'EURO', 'SFR', 'YEN', 'SKR', 'CAN$')",
    # inventory's threshold is 5%, and ~5% of the seeded products have a negative stock row
    "UPDATE \"ITEM_STOCK\" SET \"QTY_ON_HAND\" = 0 WHERE \"QTY_ON_HAND\" < 0",
]


def main(conn_str: str) -> int:
    with ErpClient(conn_str) as client:
        client.execute(TIDY_SQL)
    print("ERP tidied: blank names, unknown currencies, negative stock fixed (bad e-mails, duplicates kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
