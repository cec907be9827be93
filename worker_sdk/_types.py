"""Type shapes of workflow methods, for the overloads that let ``mypy`` infer results.

``client.execute_workflow(MyWorkflow.run, arg, ...)`` passes the unbound run method;
these protocols match it by arity so the argument is checked against the method's
parameter and the result is the method's return type (the shapes follow the Temporal
SDK's ``temporalio.types``). Methods of more parameters match
``Callable[Concatenate[SelfType, MultiParamSpec], Awaitable[ReturnType]]`` with
``args=[...]``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import ParamSpec, Protocol, TypeVar

SelfType = TypeVar("SelfType")
ParamType = TypeVar("ParamType")
ReturnType = TypeVar("ReturnType")
MultiParamSpec = ParamSpec("MultiParamSpec")

_SelfContra = TypeVar("_SelfContra", contravariant=True)
_ParamContra = TypeVar("_ParamContra", contravariant=True)
_ReturnCo = TypeVar("_ReturnCo", covariant=True)


class MethodAsyncNoParam(Protocol[_SelfContra, _ReturnCo]):
    """An async method that takes no argument besides ``self``."""

    def __call__(self, workflow: _SelfContra, /) -> Awaitable[_ReturnCo]: ...


class MethodAsyncSingleParam(Protocol[_SelfContra, _ParamContra, _ReturnCo]):
    """An async method that takes one argument besides ``self``."""

    def __call__(self, workflow: _SelfContra, arg: _ParamContra, /) -> Awaitable[_ReturnCo]: ...


class MethodSyncNoParam(Protocol[_SelfContra, _ReturnCo]):
    """A (query) method that takes no argument besides ``self``."""

    def __call__(self, workflow: _SelfContra, /) -> _ReturnCo: ...


class MethodSyncSingleParam(Protocol[_SelfContra, _ParamContra, _ReturnCo]):
    """A (query) method that takes one argument besides ``self``."""

    def __call__(self, workflow: _SelfContra, arg: _ParamContra, /) -> _ReturnCo: ...
