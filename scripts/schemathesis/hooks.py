"""Schemathesis hooks for the platform's API (`scripts/schemathesis.sh`).

Two rules of `POST /orders` cannot be said in JSON Schema, so the OpenAPI document says them in
words: each line is of another SKU, and the order's total (quantity × unit price, summed) is at
most 2^63 - 1 minor units. And an `Idempotency-Key` names one request: the same key with
another request is refused (422, as the IETF idempotency-key draft asks). Before each request
is sent, these hooks bring it within those rules (schemathesis then judges the case again as
sent); every other constraint the handlers enforce is in the document itself.
"""

import schemathesis

MAX_TOTAL = 2**63 - 1
MAX_SKU_LEN = 64

_keys = 0


def _distinct_skus(lines):
    seen = set()
    for index, line in enumerate(lines):
        sku = line.get("sku")
        if not isinstance(sku, str):
            continue
        while sku in seen:
            suffix = f"-{index}"
            sku = (sku[: MAX_SKU_LEN - len(suffix)] + suffix) if len(sku) + len(suffix) > MAX_SKU_LEN else sku + suffix
            index += len(lines)
        seen.add(sku)
        line["sku"] = sku


def _total_in_range(lines):
    priced = [
        line
        for line in lines
        if isinstance(line.get("quantity"), (int, float)) and isinstance(line.get("unit_price_minor"), (int, float))
    ]
    total = sum(int(line["quantity"]) * int(line["unit_price_minor"]) for line in priced)
    if total <= MAX_TOTAL or not priced:
        return
    quantities = sum(max(int(line["quantity"]), 1) for line in priced)
    ceiling = MAX_TOTAL // quantities
    for line in priced:
        if line["unit_price_minor"] > ceiling:
            line["unit_price_minor"] = ceiling


@schemathesis.hook
def before_call(context, case, kwargs):
    global _keys
    for name in list(case.headers or {}):
        value = case.headers[name]
        # A key too long to take a suffix is left as it is: generated at random, it is unique
        # already (and a key over 255 characters must stay one).
        if name.lower() == "idempotency-key" and isinstance(value, str) and len(value) <= 240:
            _keys += 1
            case.headers[name] = f"{value}-{_keys}"
    operation = context.operation
    if operation is None or operation.method.upper() != "POST" or operation.path != "/orders":
        return
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("lines"), list):
        lines = [line for line in body["lines"] if isinstance(line, dict)]
        _distinct_skus(lines)
        _total_in_range(lines)
