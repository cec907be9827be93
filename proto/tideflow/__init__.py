"""tideflow: a durable execution engine.

Subpackages: ``tideflow.worker_sdk`` (what users import), ``tideflow.server`` (the
gRPC service), ``tideflow.history`` (event model and store) and ``tideflow.api.v1``
(generated wire API).
"""

__version__ = "0.1.0"
