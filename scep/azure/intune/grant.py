"""`scep intune grant`: give a principal the two application permissions Intune requires of a SCEP CA
(Microsoft Intune API scep_challenge_provider, Microsoft Graph Application.Read.All) through Microsoft Graph.

Why not in Bicep: a Graph app-role grant to a user-assigned identity created in the same deployment fails at
random with 400 "Not a valid reference update" until Entra has replicated the new service principal
(microsoftgraph/msgraph-bicep-types issue 193; Entra documents no replication delay). The post-provision hook
runs this after the deployment instead, and it waits out exactly that answer (and a 404 for a principal not
replicated yet), so the first `azd up` succeeds. Granting twice is harmless: existing grants are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests
from azure.core.credentials import TokenCredential

from scep.azure.errors import translated
from scep.azure.intune.client import GRAPH_ROLE, INTUNE_API_APP_ID, SCEP_ROLE

MICROSOFT_GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
SCEP_CHALLENGE_PROVIDER_ROLE_ID = "39d724e8-6a34-4930-9a36-364082c35716"
APPLICATION_READ_ALL_ROLE_ID = "9a5d68dd-52b0-4cc2-bd40-abcf44ac3a30"
# (resource application, app role id, role name)
INTUNE_ROLES = (
    (INTUNE_API_APP_ID, SCEP_CHALLENGE_PROVIDER_ROLE_ID, SCEP_ROLE),
    (MICROSOFT_GRAPH_APP_ID, APPLICATION_READ_ALL_ROLE_ID, GRAPH_ROLE),
)
NOT_REPLICATED_YET = "Not a valid reference update"
RETRY_PAUSE_SECONDS = 10.0


class GrantError(Exception):
    """Graph refused a step for a reason waiting will not fix, or replication took longer than allowed."""


class _NotYet(Exception):
    """An answer that means Entra has not replicated a new object yet: try again later."""


class GraphApi:
    def __init__(self, credential: TokenCredential, graph_url: str, session: requests.Session | None = None) -> None:
        self._credential = credential
        self._base = graph_url.rstrip("/")
        self._session = session or requests.Session()

    def call(self, method: str, path: str, body: dict[str, str] | None = None) -> dict[str, Any]:
        with translated(lambda detail: GrantError(f"no token for Microsoft Graph ({detail})")):
            token = self._credential.get_token(f"{self._base}/.default").token
        response = self._session.request(
            method, f"{self._base}/v1.0/{path}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        if response.status_code == 404 or (response.status_code == 400 and NOT_REPLICATED_YET in response.text):
            raise _NotYet(f"{method} {path}: HTTP {response.status_code}")
        if response.status_code == 429 or response.status_code >= 500:
            raise _NotYet(f"{method} {path}: HTTP {response.status_code}")
        if response.status_code >= 400:
            refusal = f"HTTP {response.status_code}: {_message(response)}"
            raise GrantError(f"Microsoft Graph refused {method} {path} ({refusal})")
        return response.json() if response.content else {}


def grant_intune_roles(
    api: GraphApi,
    *,
    principal_id: str | None = None,
    client_id: str | None = None,
    wait_seconds: float = 900.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """Grant both roles to the service principal `principal_id` (object id) or to that of the application
    `client_id`, waiting up to wait_seconds for replication. Returns one line per role saying what was done."""
    deadline = clock() + wait_seconds

    def patiently(step: Callable[[], Any]) -> Any:
        while True:
            try:
                return step()
            except _NotYet as not_yet:
                if clock() + RETRY_PAUSE_SECONDS > deadline:
                    raise GrantError(f"still not replicated after {wait_seconds:.0f} s ({not_yet})") from None
                sleep(RETRY_PAUSE_SECONDS)

    if principal_id is None:
        principal_id = patiently(lambda: _principal_of(api, client_id or ""))
    held = patiently(lambda: api.call("GET", f"servicePrincipals/{principal_id}/appRoleAssignments"))
    granted = {(item["resourceId"], item["appRoleId"]) for item in held.get("value", [])}
    lines = []
    for app_id, role_id, role_name in INTUNE_ROLES:
        resource_id = patiently(lambda app_id=app_id: _principal_of(api, app_id))
        if (resource_id, role_id) in granted:
            lines.append(f"{role_name}: already granted to {principal_id}")
            continue
        body = {"principalId": principal_id, "resourceId": resource_id, "appRoleId": role_id}
        patiently(lambda body=body: api.call("POST", f"servicePrincipals/{principal_id}/appRoleAssignments", body))
        lines.append(f"{role_name}: granted to {principal_id}")
    return lines


def _principal_of(api: GraphApi, app_id: str) -> str:
    return api.call("GET", f"servicePrincipals(appId='{app_id}')?$select=id")["id"]


def _message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
