"""A coupon's details, their list of claimants written by the database: the one answer
whose bulk bypasses DRF's renderer.

The details list every claimant, 100,000 of them for a big coupon. Through the ORM and
CouponSerializer, the database built the list, Python decoded it into 100,000 strings and
DRF's JSONRenderer encoded them again. Here one statement reads the coupon's row and its
claims in claim order (one snapshot, so the counter and the list always agree), the
database writes the list as compact JSON, and JSONRenderer writes the rest of the object
around it: no Python object per claim.

Measured in pairs on 2026-12-04 (`make bench-compare REV=d9c0879 SCENARIOS=B3`, the list
read by the ORM and written by CouponSerializer and JSONRenderer; 2 cores shared with
PostgreSQL): B3's read of a coupon with 100,000 claims 0.67 × the time on a fresh table
(27 against 40 ms; 0.48 × over four pairs as the claims table grew, as that form's
subquery bound "id > 0" as a parameter, which the partial index cannot serve) and 0.50 × a
worker's peak memory. docs/performance.md, "The details document", has the figures.

The document is written exactly as DRF's JSONRenderer writes CouponSerializer's answer:
compact, UTF-8, with U+2028 and U+2029 escaped (test_http_server.py compares the two byte for
byte, on PostgreSQL and SQLite).
"""

from django.db import DEFAULT_DB_ALIAS, connections
from rest_framework.renderers import JSONRenderer

from coupons.models import ClaimHistory, Coupon, StockShard

# "h.id > 0", true of every claim, lets the claims be read in claim order through
# claim_coupon_order_idx (see ClaimHistory.Meta). One statement: one snapshot, of the claims
# and of the stock left, on the coupon's row or in its shards (Coupon.stock_left).
_SHARD_STOCK = (
    "COALESCE((SELECT sum(s.remaining_amount) FROM {shards} s WHERE s.coupon_id = c.id), 0)"
)
_POSTGRESQL = """
    SELECT c.name, c.amount, c.remaining_amount + {shard_stock}, array_to_json(ARRAY(
        SELECT h.user_id FROM {claims} h WHERE h.coupon_id = c.id AND h.id > 0 ORDER BY h.id
    ))::text
    FROM {coupons} c WHERE c.name = %s
"""
# SQLite before 3.44 has no ORDER BY inside an aggregate; it aggregates an ordered
# subquery in that order.
_SQLITE = """
    SELECT c.name, c.amount, c.remaining_amount + {shard_stock}, (
        SELECT json_group_array(user_id) FROM (
            SELECT h.user_id FROM {claims} h WHERE h.coupon_id = c.id AND h.id > 0
            ORDER BY h.id
        )
    )
    FROM {coupons} c WHERE c.name = %s
"""


def details_document(name: str, *, using: str = DEFAULT_DB_ALIAS) -> bytes | None:
    """The details of the coupon of this name as a JSON document, or None if there is none."""
    connection = connections[using]
    sql = _POSTGRESQL if connection.vendor == "postgresql" else _SQLITE
    with connection.cursor() as cursor:
        tables = {
            "coupons": Coupon._meta.db_table,
            "claims": ClaimHistory._meta.db_table,
            "shards": StockShard._meta.db_table,
        }
        shard_stock = _SHARD_STOCK.format(**tables)
        cursor.execute(sql.format(shard_stock=shard_stock, **tables), [name])
        row = cursor.fetchone()
    if row is None:
        return None
    name, amount, remaining_amount = row[:3]
    claimed_by: str = row[3]
    # The database writes the list compactly, as the renderer would, but leaves U+2028 and
    # U+2029 as they are, where the renderer escapes them.
    if "\u2028" in claimed_by or "\u2029" in claimed_by:
        claimed_by = claimed_by.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    # DRF's renderer writes the rest; the list goes in as the last member.
    head: bytes = JSONRenderer().render(
        {"name": name, "amount": amount, "remaining_amount": remaining_amount}
    )
    return head[:-1] + b',"claimed_by":' + claimed_by.encode() + b"}"
