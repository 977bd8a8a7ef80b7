"""The order workload's rows in the canonical form the Rust tests compare against
(`Order::expected_json` in src/workload.rs): decimals as strings, timestamps as UTC epoch ms,
dates as epoch days, the `day` partition as `YYYY-MM-DD`, maps as sorted pairs."""
import datetime
import decimal


def plain(v):
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=datetime.timezone.utc)
        return int(round(v.timestamp() * 1000))
    if isinstance(v, datetime.date):
        return (v - datetime.date(1970, 1, 1)).days
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def order_row(r):
    addr = r.get("address")
    attrs = r.get("attributes")
    if isinstance(attrs, dict):
        attrs = list(attrs.items())
    return {
        "writer": r.get("writer"),
        "p": r["_kafka_partition"],
        "o": r["_kafka_offset"],
        "day": str(r.get("day")) if r.get("day") is not None else None,
        "id": r.get("id"),
        "order_id": r.get("order_id"),
        "product": r.get("product"),
        "quantity": r.get("quantity"),
        "cost": plain(r.get("cost")),
        "ts": plain(r.get("ts")),
        "ship_date": plain(r.get("ship_date")),
        "status": r.get("status"),
        "coupon": r.get("coupon"),
        "city": addr["city"] if addr else None,
        "tags": r.get("tags"),
        "attributes": sorted([list(kv) for kv in attrs]) if attrs is not None else None,
    }
