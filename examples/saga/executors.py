"""Executors of the order saga (examples/saga/order.yaml) over a small SQLite shop.

Each step and its compensation is idempotent (keyed by order / payment id), so a
retried attempt never applies twice. ``shipping.book`` rejects addresses containing
"nowhere"; ``payments.refund`` fails its first ``fail_attempts`` attempts.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from tideflow.worker_sdk import dag
from tideflow.worker_sdk.exceptions import ApplicationError


def _db() -> sqlite3.Connection:
    return sqlite3.connect(os.environ.get("SAGA_SHOP_DB", "shop.db"))


def init_shop(path: Path, stock: int = 10) -> None:
    """A fresh shop: one product with ``stock`` units."""
    path.unlink(missing_ok=True)
    os.environ["SAGA_SHOP_DB"] = str(path)
    with _db() as conn:
        conn.execute("CREATE TABLE stock (sku TEXT PRIMARY KEY, units INTEGER)")
        conn.execute("CREATE TABLE reservations (order_id TEXT PRIMARY KEY, sku TEXT, units INT)")
        conn.execute(
            "CREATE TABLE payments (payment_id TEXT PRIMARY KEY, order_id TEXT, cents INT, "
            "status TEXT)"
        )
        conn.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry TEXT)")
        conn.execute("INSERT INTO stock VALUES ('widget', ?)", (stock,))


def _log(conn: sqlite3.Connection, entry: str) -> None:
    conn.execute("INSERT INTO log (entry) VALUES (?)", (entry,))


@dag.executor("inventory.reserve")
def reserve(params: dict[str, Any]) -> dict[str, Any]:
    with _db() as conn:
        if (
            conn.execute(
                "SELECT 1 FROM reservations WHERE order_id = ?", (params["order_id"],)
            ).fetchone()
            is None
        ):
            (units,) = conn.execute(
                "SELECT units FROM stock WHERE sku = ?", (params["sku"],)
            ).fetchone()
            if units < params["quantity"]:
                raise ApplicationError("out of stock", type="OutOfStock", non_retryable=True)
            conn.execute(
                "UPDATE stock SET units = units - ? WHERE sku = ?",
                (params["quantity"], params["sku"]),
            )
            conn.execute(
                "INSERT INTO reservations VALUES (?, ?, ?)",
                (params["order_id"], params["sku"], params["quantity"]),
            )
            _log(conn, f"reserved {params['quantity']} {params['sku']}")
    return {"reserved": params["quantity"]}


@dag.executor("inventory.release")
def release(params: dict[str, Any]) -> dict[str, Any]:
    with _db() as conn:
        row = conn.execute(
            "SELECT units FROM reservations WHERE order_id = ?", (params["order_id"],)
        ).fetchone()
        if row is not None:
            conn.execute(
                "UPDATE stock SET units = units + ? WHERE sku = ?", (row[0], params["sku"])
            )
            conn.execute("DELETE FROM reservations WHERE order_id = ?", (params["order_id"],))
            _log(conn, f"released {row[0]} {params['sku']}")
    return {"released": params["quantity"]}


@dag.executor("payments.charge")
def charge(params: dict[str, Any]) -> dict[str, Any]:
    payment_id = f"pay-{params['order_id']}"
    with _db() as conn:
        conn.execute(
            "INSERT OR IGNORE INTO payments VALUES (?, ?, ?, 'CHARGED')",
            (payment_id, params["order_id"], params["amount_cents"]),
        )
        _log(conn, f"charged {params['amount_cents']} cents")
    return {"payment_id": payment_id}


@dag.executor("payments.refund")
def refund(params: dict[str, Any]) -> dict[str, Any]:
    attempt = dag.executor_info().attempt
    if attempt <= int(params.get("fail_attempts", 0)):
        raise RuntimeError(f"payment provider unavailable (attempt {attempt})")
    with _db() as conn:
        conn.execute(
            "UPDATE payments SET status = 'REFUNDED' WHERE payment_id = ?", (params["payment_id"],)
        )
        _log(conn, f"refunded {params['payment_id']}")
    return {"refunded": params["payment_id"]}


@dag.executor("shipping.book")
def book(params: dict[str, Any]) -> dict[str, Any]:
    if "nowhere" in params["address"]:
        raise RuntimeError(f"carrier rejected the address {params['address']!r}")
    return {"tracking": f"trk-{params['order_id']}"}


@dag.executor("shipping.cancel")
def cancel_shipment(params: dict[str, Any]) -> dict[str, Any]:
    return {"cancelled": params["result"]["tracking"]}


@dag.executor("orders.confirm")
def confirm(params: dict[str, Any]) -> dict[str, Any]:
    return {"confirmation": f"order {params['order_id']} confirmed"}


EXECUTORS = [reserve, release, charge, refund, book, cancel_shipment, confirm]
