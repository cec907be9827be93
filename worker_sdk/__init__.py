"""The tideflow worker SDK: what users import.

```python
from tideflow.worker_sdk import workflow, activity, Client, Worker, RetryPolicy
```
"""

from . import activity, exceptions, workflow
from ._tls import TLSConfig
from .client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowHistory,
)
from .common import RetryPolicy, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from .converter import DataConverter, JSONPayloadConverter, PayloadConverter
from .interceptor import WorkerInterceptor
from .replayer import Replayer, ReplayResult
from .worker import Worker

__all__ = [
    "Client",
    "DataConverter",
    "JSONPayloadConverter",
    "PayloadConverter",
    "ReplayResult",
    "Replayer",
    "RetryPolicy",
    "TLSConfig",
    "Worker",
    "WorkerInterceptor",
    "WorkflowExecutionDescription",
    "WorkflowExecutionStatus",
    "WorkflowHandle",
    "WorkflowHistory",
    "WorkflowIDConflictPolicy",
    "WorkflowIDReusePolicy",
    "activity",
    "exceptions",
    "workflow",
]
