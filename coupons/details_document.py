"""A coupon's details written by the database as one JSON document: the one answer that
bypasses DRF's renderer.

The details list every claimant, 100,000 of them for a big coupon. Through the ORM and
CouponSerializer, the database built the list, Python decoded it into 100,000 strings and
DRF's JSONRenderer encoded them again. Here one statement reads the coupon's row and its
claims in claim order and writes the document, which is passed through as it comes: one
snapshot, so the counter and the list always agree, and no Python object per claim.

Measured in pairs on 2026-12-04 (`make bench-compare REV=<the ORM and DRF form>
SCENARIOS=B3`; 2 cores shared with PostgreSQL): B3's median read of a coupon with 100,000
claims 0.53 × the time (21 against 40 ms) and a worker's peak memory 0.49 × (101 against
206 MiB). docs/performance.md, "Reading the details", has the figures.

The document is written exactly as DRF's JSONRenderer writes CouponSerializer's answer:
compact, UTF-8, with U+2028 and U+2029 escaped (test_api.py compares the two byte for byte).
"""

from django.db import DEFAULT_DB_ALIAS, connections
from rest_framework.renderers import JSONRenderer

from coupons.models import ClaimHistory, Coupon

# "h.id > 0", true of every claim, lets the claims be read in claim order through
# claim_coupon_order_idx (see ClaimHistory.Meta). One statement: one snapshot.
_POSTGRESQL = """
    SELECT c.name, c.amount, c.remaining_amount, array_to_json(ARRAY(
        SELECT h.user_id FROM {claims} h WHERE h.coupon_id = c.id AND h.id > 0 ORDER BY h.id
    ))::text
    FROM {coupons} c WHERE c.name = %s
"""
# SQLite before 3.44 has no ORDER BY inside an aggregate; it aggregates an ordered
# subquery in that order.
_SQLITE = """
    SELECT c.name, c.amount, c.remaining_amount, (
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
        cursor.execute(
            sql.format(coupons=Coupon._meta.db_table, claims=ClaimHistory._meta.db_table), [name]
        )
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
