"""The one translation of Azure SDK errors: the status or the error type, the SDK's first line, a hint for the
status when the caller has one, and the SDK's error chained as the cause."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError

from scep.azure.errors import translated

HINTS = {409: "recover the deleted secret or pick another name"}


class ProjectError(Exception):
    pass


def _answered(status: int) -> HttpResponseError:
    error = HttpResponseError(message="Secret x is currently in a deleted but recoverable state\nsecond line")
    error.status_code = status
    return error


def test_a_hinted_status_gets_its_hint_after_the_first_line() -> None:
    sdk_error = _answered(409)
    with pytest.raises(ProjectError) as caught, translated(ProjectError, HINTS):
        raise sdk_error
    assert str(caught.value) == (
        "HTTP 409: Secret x is currently in a deleted but recoverable state; "
        "recover the deleted secret or pick another name"
    )
    assert caught.value.__cause__ is sdk_error


def test_another_status_or_no_answer_gets_no_hint() -> None:
    forbidden = r"^HTTP 403: Secret x is currently in a deleted but recoverable state$"
    with pytest.raises(ProjectError, match=forbidden), translated(ProjectError, HINTS):
        raise _answered(403)
    unreachable = r"^ServiceRequestError: connection refused$"
    with pytest.raises(ProjectError, match=unreachable), translated(ProjectError, HINTS):
        raise ServiceRequestError("connection refused")
