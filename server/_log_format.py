"""How the ``tideflow`` command logs: ``--log-format text`` (one readable line per
record, the default) or ``json`` (one JSON object per line, for log collectors:
``time``, ``level``, ``logger``, ``message``, and ``exception`` with the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def add_observability_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port``, ``--log-format`` and ``--otel`` of ``server start-dev`` and
    ``start``."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics and /healthz over HTTP on this port (0: any free one)",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON"
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="OpenTelemetry spans of the RPCs served, to the global tracer provider "
        "(run under opentelemetry-instrument to export them; needs tideflow[otel])",
    )


def check_observability_arguments(args: argparse.Namespace) -> None:
    """Refuse, in one line (ValueError), what would only fail after the store opened."""
    port = args.metrics_port
    if port is not None and not 0 <= port < 65536:
        raise ValueError(f"--metrics-port {port}: not a port number (0 for any free port)")
    if args.otel:
        try:
            import opentelemetry.trace  # noqa: F401
        except ImportError:
            raise ValueError("--otel needs OpenTelemetry: pip install 'tideflow[otel]'") from None


def configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at ``level`` in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    # Like basicConfig: a no-op where logging is configured already (an embedding
    # program, pytest's capture).
    numeric = getattr(logging, str(level).upper(), logging.INFO)
    logging.basicConfig(level=numeric, handlers=[handler])
