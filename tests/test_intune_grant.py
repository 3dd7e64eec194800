"""`scep intune grant`: both Intune app roles are granted, Entra's replication delay ("Not a valid reference
update", msgraph-bicep-types issue 193) is waited out, existing grants are kept, and a real refusal stops it.
Also: `scep doctor` gives each Intune line its own result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from azure.core.credentials import AccessToken

from scep.azure.intune.check import CheckReport
from scep.azure.intune.client import INTUNE_API_APP_ID
from scep.azure.intune.grant import (
    APPLICATION_READ_ALL_ROLE_ID,
    MICROSOFT_GRAPH_APP_ID,
    SCEP_CHALLENGE_PROVIDER_ROLE_ID,
    GrantError,
    GraphApi,
    grant_intune_roles,
)
from scep.findings import Finding, Status
from scep.tools import doctor

PRINCIPAL = "11111111-1111-1111-1111-111111111111"
SERVICE_PRINCIPALS = {INTUNE_API_APP_ID: "intune-sp", MICROSOFT_GRAPH_APP_ID: "graph-sp", "app-1": PRINCIPAL}


@dataclass
class Answer:
    status_code: int
    body: Any = None

    @property
    def text(self) -> str:
        return json.dumps(self.body)

    @property
    def content(self) -> bytes:
        return self.text.encode() if self.body is not None else b""

    def json(self) -> Any:
        return self.body


@dataclass
class FakeGraph:
    """Graph's service principal and appRoleAssignments endpoints; the new principal appears after `lag` calls."""

    lag: int = 0
    refuse: bool = False
    assignments: list[dict[str, str]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def request(self, method: str, url: str, json: Any = None, headers: Any = None, timeout: float = 0) -> Answer:
        path = url.split("/v1.0/", 1)[1]
        self.requests.append(f"{method} {path}")
        assert headers["Authorization"] == "Bearer token"
        if path.startswith("servicePrincipals(appId="):
            app_id = path.split("'")[1]
            return Answer(200, {"id": SERVICE_PRINCIPALS[app_id]})
        if self.lag > 0:
            self.lag -= 1
            if method == "GET":
                return Answer(404, {"error": {"code": "Request_ResourceNotFound", "message": "not found"}})
            return Answer(400, {"error": {"code": "Request_BadRequest", "message": "Not a valid reference update."}})
        if self.refuse:
            return Answer(403, {"error": {"code": "Authorization_RequestDenied", "message": "Insufficient privileges"}})
        if method == "GET":
            return Answer(200, {"value": self.assignments})
        self.assignments.append(json)
        return Answer(201, json)


class Token:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        assert scopes == ("https://graph.microsoft.com/.default",)
        return AccessToken("token", 2**31)


def api(graph: FakeGraph) -> GraphApi:
    return GraphApi(Token(), "https://graph.microsoft.com/", session=graph)  # type: ignore[arg-type]


def granted(graph: FakeGraph) -> set[tuple[str, str, str]]:
    return {(a["principalId"], a["resourceId"], a["appRoleId"]) for a in graph.assignments}


EXPECTED = {
    (PRINCIPAL, "intune-sp", SCEP_CHALLENGE_PROVIDER_ROLE_ID),
    (PRINCIPAL, "graph-sp", APPLICATION_READ_ALL_ROLE_ID),
}


def test_both_roles_are_granted_after_waiting_out_replication() -> None:
    graph = FakeGraph(lag=3)
    pauses: list[float] = []
    lines = grant_intune_roles(api(graph), principal_id=PRINCIPAL, sleep=pauses.append, clock=lambda: len(pauses) * 10)
    assert granted(graph) == EXPECTED
    assert len(pauses) == 3
    assert lines == [
        f"scep_challenge_provider: granted to {PRINCIPAL}",
        f"Application.Read.All: granted to {PRINCIPAL}",
    ]


def test_granting_again_keeps_the_existing_grants() -> None:
    graph = FakeGraph()
    grant_intune_roles(api(graph), principal_id=PRINCIPAL, sleep=lambda _: None)
    graph.requests.clear()
    lines = grant_intune_roles(api(graph), principal_id=PRINCIPAL, sleep=lambda _: None)
    assert all(line.endswith(f"already granted to {PRINCIPAL}") for line in lines)
    assert not [r for r in graph.requests if r.startswith("POST")]


def test_an_app_registration_is_found_by_its_client_id() -> None:
    graph = FakeGraph()
    grant_intune_roles(api(graph), client_id="app-1", sleep=lambda _: None)
    assert granted(graph) == EXPECTED


def test_a_refusal_stops_at_once_and_says_why() -> None:
    graph = FakeGraph(refuse=True)
    with pytest.raises(GrantError, match="HTTP 403: Insufficient privileges"):
        grant_intune_roles(api(graph), principal_id=PRINCIPAL, sleep=lambda _: pytest.fail("no waiting on a 403"))


def test_replication_that_never_ends_gives_up_after_the_wait() -> None:
    graph = FakeGraph(lag=10**6)
    pauses: list[float] = []
    with pytest.raises(GrantError, match="still not replicated after 60 s"):
        grant_intune_roles(
            api(graph), principal_id=PRINCIPAL, wait_seconds=60, sleep=pauses.append, clock=lambda: len(pauses) * 10
        )
    assert len(pauses) == 6  # at 0, 10, ... 50 s; one more pause would pass the 60 s


def test_doctor_gives_each_intune_line_its_own_result(monkeypatch: pytest.MonkeyPatch) -> None:
    report = CheckReport()
    report.add(Status.OK, "Graph token", "obtained")
    report.add(Status.WARN, "Intune token", "obtained, but without the scep_challenge_provider role")
    report.add(Status.FAIL, "Service discovery", "Graph refused the endpoint lookup (403)")
    monkeypatch.setattr("scep.azure.intune.check.run_check", lambda client: report)
    monkeypatch.setattr(doctor.config, "build_intune_client", lambda settings: None)
    findings = list(doctor._check_intune(None))  # type: ignore[arg-type]
    assert [(finding.ok, finding.step.removeprefix("intune: ")) for finding in findings] == [
        (True, "Graph token"),
        (True, "Intune token"),
        (False, "Service discovery"),
    ]


def test_doctor_and_intune_check_print_their_lines_one_way(capsys: pytest.CaptureFixture[str]) -> None:
    from scep.tools.cli import _print_findings

    warned = [Finding(Status.OK, "obtained", "Graph token"), Finding(Status.WARN, "no role", "Intune token")]
    assert _print_findings(warned) == 0, "a warning alone is not a failure"
    assert _print_findings([Finding(Status.FAIL, "RA key cannot sign"), *warned]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "[ok] Graph token: obtained",
        "[warn] Intune token: no role",
        "[fail] RA key cannot sign",
        "[ok] Graph token: obtained",
        "[warn] Intune token: no role",
    ]
