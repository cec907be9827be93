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
from .codec import (
    AESGCMCodec,
    PayloadCodec,
    PayloadCodecChain,
    PayloadCodecError,
    ZlibCodec,
    ZstdCodec,
    decode_history,
)
from .common import RetryPolicy, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from .converter import DataConverter, JSONPayloadConverter, PayloadConverter
from .interceptor import WorkerInterceptor
from .replayer import Replayer, ReplayResult
from .worker import Worker

__all__ = [
    "AESGCMCodec",
    "Client",
    "DataConverter",
    "JSONPayloadConverter",
    "PayloadCodec",
    "PayloadCodecChain",
    "PayloadCodecError",
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
    "ZlibCodec",
    "ZstdCodec",
    "activity",
    "decode_history",
    "exceptions",
    "workflow",
]
