"""One translation from Azure SDK failures to the project's own errors.

Every Azure call the app makes (Key Vault keys and secrets, Table Storage, Entra ID tokens) ends in its result
or in a project error (CustodyError, SecretError, StoreError, IntuneAuthenticationError, GrantError), built
here from the SDK's exception: the HTTP status, or the exception's type when no response came, and the first
line of the SDK's message, bounded. The SDK's exception stays chained as the cause.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

MAX_DETAIL_CHARS = 300


def first_line(error: BaseException) -> str:
    """The first line of an error's message (bounded), or its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0][:MAX_DETAIL_CHARS] if text else type(error).__name__


def describe(error: BaseException) -> str:
    """'HTTP 403: <first line>' for an answer from the service, '<ErrorType>: <first line>' for anything else."""
    status = getattr(error, "status_code", None)
    return f"HTTP {status}: {first_line(error)}" if status else f"{type(error).__name__}: {first_line(error)}"


@contextmanager
def translated(
    into: Callable[[str], Exception],
    hints: Mapping[int, str] | None = None,
    not_found: Callable[[str], Exception] | None = None,
) -> Iterator[None]:
    """Whatever the Azure SDK raises in the block becomes `into(describe(error))`, chained to the SDK's error.

    hints: what to do about an HTTP status, added after the description ("HTTP 403: ...; <hint>").
    not_found: the error for an HTTP 404 instead of `into`, for callers to whom absent is not a failure.
    ValueError counts too: the Key Vault SDK raises it for an authentication challenge it rejects
    (verify_challenge_resource).
    """
    from azure.core.exceptions import AzureError

    try:
        yield
    except (AzureError, ValueError) as error:
        detail = describe(error)
        status = getattr(error, "status_code", None) or 0
        hint = (hints or {}).get(status)
        make = not_found if status == 404 and not_found is not None else into
        raise make(f"{detail}; {hint}" if hint else detail) from error
