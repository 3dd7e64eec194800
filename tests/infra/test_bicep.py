"""Static checks of the Azure deployment (infra/): it parses, passes checkov, and has the intended security posture.

The Bicep is read with pycep-parser (>= 0.7, which understands `extension` statements). pycep's JSON does not
distinguish an identifier from a string literal (`name: foo` and `name: 'foo'` both give "foo"), so a string that
names a variable of the same file is resolved to that variable's value, and a string that names a parameter is
treated as a reference to it.

No Bicep CLI is needed (it downloads a native binary); deployment-time behaviour is for `az deployment group
what-if`, not for these tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

pycep = pytest.importorskip("pycep", reason="pip install 'pycep-parser>=0.7'")
from pycep import BicepParser  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MODULES = INFRA / "modules"

GRAPH_EXTENSION = "microsoftGraphV1"
GRAPH_EXTENSION_REF = "br:mcr.microsoft.com/bicep/extensions/microsoftgraph/v1.0:1.0.0"

ROLE = {
    "Key Vault Crypto User": "12338af0-0e69-4776-bea7-57ae8d297424",
    "Key Vault Crypto Officer": "14b46e9e-c2b7-41b4-b07b-48a6ebf60603",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
    "Key Vault Certificates Officer": "a4417e6f-fecd-4de8-b567-7b0420556985",
    "Key Vault Secrets Officer": "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
    "Key Vault Certificate User": "db79e9a7-68ee-4b58-9aeb-b90e7c24fcba",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}

# Custom roles defined in the Bicep, named by their symbolic name.
RA_RENEWAL_ROLE = "custom:raRenewalRole"

# What the RA's self-renewal writes, and nothing more: new certificate versions and their merge, their tags and
# the bootstrap version's disabling, the encryption twin's secret (docs/keyvault.md, "Roles the app needs").
RA_RENEWAL_DATA_ACTIONS = {
    "Microsoft.KeyVault/vaults/certificates/create/action",
    "Microsoft.KeyVault/vaults/certificates/update/action",
    "Microsoft.KeyVault/vaults/secrets/setSecret/action",
}

# (principal, resource type of the scope) -> roles. Set equality: nothing more, nothing less.
INTENDED_ROLES = {
    ("identity", "Microsoft.KeyVault/vaults"): {
        ROLE["Key Vault Crypto User"],
        ROLE["Key Vault Certificate User"],
        ROLE["Key Vault Secrets User"],
        RA_RENEWAL_ROLE,
    },
    ("deployer", "Microsoft.KeyVault/vaults"): {
        ROLE["Key Vault Certificates Officer"],
        ROLE["Key Vault Crypto Officer"],
        ROLE["Key Vault Secrets Officer"],  # only with deployerWritesSecrets, see test_deployer_roles_*
    },
    ("identity", "Microsoft.Storage/storageAccounts"): {
        ROLE["Storage Blob Data Owner"],
        ROLE["Storage Table Data Contributor"],
    },
    ("identity", "Microsoft.Insights/components"): {ROLE["Monitoring Metrics Publisher"]},
}

# Module parameters that carry a principal id, and what main.bicep must pass into them.
PRINCIPAL_PARAMS = {"identityPrincipalId": "identity", "deployerPrincipalId": "deployer"}

INTUNE_API_APP_ID = "c161e42e-d4df-4a3d-9b42-e7a3c31f59d4"
MICROSOFT_GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
SCEP_CHALLENGE_PROVIDER = "39d724e8-6a34-4930-9a36-364082c35716"
APPLICATION_READ_ALL = "9a5d68dd-52b0-4cc2-bd40-abcf44ac3a30"

# What the Functions host itself needs on Flex Consumption with identity-based storage and Entra-only telemetry.
HOST_SETTINGS = {
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__tableServiceUri",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
}
FORBIDDEN_ON_FLEX = {"FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE"}

PRODUCT_SETTING = re.compile(r"^(SCEP|INTUNE|KEY_VAULT)_[A-Z0-9_]+$")


# ---------------------------------------------------------------------------------------------------- parsing


@cache
def parser() -> BicepParser:
    return BicepParser()


@cache
def parsed(path: Path) -> dict[str, Any]:
    return parser().parse(text=path.read_text())


def bicep_files() -> list[Path]:
    return sorted(INFRA.rglob("*.bicep"))


def module(name: str) -> dict[str, Any]:
    return parsed(MODULES / name)


def bicepparam_as_bicep(text: str) -> tuple[str, str]:
    """pycep has no grammar for .bicepparam. Its two constructs are rewritten into ones it parses:
    the single `using '<template>'` line is removed (and returned), and each `param <name> = <expr>`
    becomes `var <name> = <expr>`, so the expressions are still parsed. Nothing else is changed."""
    using = re.findall(r"^using\s+'([^']+)'\s*$", text, flags=re.M)
    assert len(using) == 1, "a .bicepparam file has exactly one `using` line"
    body = re.sub(r"^using\s+'[^']+'\s*$", "", text, flags=re.M)
    body = re.sub(r"^param(\s+\w+\s*=)", r"var\1", body, flags=re.M)
    return using[0], body


def resolve(value: Any, doc: dict[str, Any]) -> Any:
    """Replace a string naming a variable of `doc` by that variable's value (recursively)."""
    variables = doc.get("variables", {})
    seen: set[str] = set()
    while isinstance(value, str) and value in variables and value not in seen:
        seen.add(value)
        value = variables[value]["value"]
    return value


def resource_body(resource: dict[str, Any]) -> dict[str, Any]:
    """The object literal of a resource, looking through `if (...)` and `[for ...]` wrappers."""
    config = resource["config"]
    while isinstance(config.get("config"), dict) and ("condition" in config or "loop_type" in config):
        config = config["config"]
    return config


def resources_of_type(doc: dict[str, Any], resource_type: str) -> dict[str, dict[str, Any]]:
    return {
        name: resource
        for name, resource in doc.get("resources", {}).items()
        if resource["type"] == resource_type and not resource["existing"]
    }


def single(doc: dict[str, Any], resource_type: str) -> dict[str, Any]:
    found = resources_of_type(doc, resource_type)
    assert len(found) == 1, f"expected one {resource_type}, found {sorted(found)}"
    return resource_body(next(iter(found.values())))


def param_default(doc: dict[str, Any], name: str) -> Any:
    return doc["parameters"][name].get("default")


def allowed_values(doc: dict[str, Any], name: str) -> list[Any] | None:
    for decorator in doc["parameters"][name]["decorators"]:
        if decorator["type"] == "allowed":
            return decorator["argument"]
    return None


def array_items(value: Any, doc: dict[str, Any]) -> list[Any]:
    """Items of an array expression: a literal array, a variable holding one, or `cond ? [..] : [..]` (both)."""
    value = resolve(value, doc)
    if isinstance(value, list):
        return [resolve(item, doc) for item in value]
    if "function" in value:
        assert value["function"]["type"] == "concat", f"not an array expression: {value}"
        return [item for part in value["function"]["parameters"].values() for item in array_items(part, doc)]
    operator = value["operator"]
    assert operator["type"] == "conditional", f"not an array expression: {value}"
    operands = operator["operands"]
    return array_items(operands["true_value"], doc) + array_items(operands["false_value"], doc)


def flatten_strings(value: Any, doc: dict[str, Any]) -> list[str]:
    """Every string reachable from `value` (through arrays, conditionals and variables)."""
    value = resolve(value, doc)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in flatten_strings(item, doc)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in flatten_strings(item, doc)]
    return []


# ---------------------------------------------------------------------------------------------------- syntax


def test_pycep_is_new_enough() -> None:
    from importlib.metadata import version

    major, minor = (int(part) for part in version("pycep-parser").split(".")[:2])
    assert (major, minor) >= (0, 7), "pycep-parser >= 0.7 is needed (extension statements, any function name)"


@pytest.mark.parametrize("path", bicep_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_bicep_file_parses(path: Path) -> None:
    doc = parsed(path)
    assert doc.get("resources") or doc.get("modules"), f"{path.name} declares nothing"


def test_only_the_graph_module_uses_an_extension() -> None:
    with_extensions = {
        p.name: set(parsed(p).get("extensions", {})) for p in bicep_files() if parsed(p).get("extensions")
    }
    graph_modules = ("intune-application.bicep", "admin-application.bicep")
    assert with_extensions == {name: {GRAPH_EXTENSION} for name in graph_modules}


def test_the_admin_api_accepts_only_its_app_registration_with_the_admin_role() -> None:
    from scep.config import SETTINGS

    text = (INFRA / "modules" / "admin-application.bicep").read_text()
    default_role = next(setting.default for setting in SETTINGS if setting.name == "SCEP_ADMIN_ROLE")
    assert f"value: '{default_role}'" in text and "requestedAccessTokenVersion: 2" in text
    assert "appRoleAssignmentRequired: true" in text
    settings = app_settings()
    assert settings["SCEP_ADMIN_AUTH"] == "entra" and settings["SCEP_ADMIN_AUDIENCE"] == "adminClientId"


def test_bicepconfig_registers_the_graph_extension() -> None:
    config = json.loads((INFRA / "bicepconfig.json").read_text())
    assert config["extensions"] == {GRAPH_EXTENSION: GRAPH_EXTENSION_REF}


def test_bicepparam_parses_and_names_only_template_parameters() -> None:
    template, body = bicepparam_as_bicep((INFRA / "main.bicepparam").read_text())
    assert template == "main.bicep"
    values = parser().parse(text=body)["variables"]
    main = parsed(INFRA / "main.bicep")
    unknown = set(values) - set(main["parameters"])
    assert not unknown, f"main.bicepparam sets parameters main.bicep does not declare: {sorted(unknown)}"
    for name, entry in values.items():
        fallback = environment_default(entry["value"])
        allowed = allowed_values(main, name)
        if allowed is not None and fallback is not None:
            assert fallback in [str(a) for a in allowed], f"{name}: default {fallback!r} not in {allowed}"


def environment_default(expression: Any) -> str | None:
    """The fallback of readEnvironmentVariable(name, fallback), looking through int()/bool()."""
    if not isinstance(expression, dict) or "function" not in expression:
        return None
    function = expression["function"]
    if function["type"] == "readEnvironmentVariable":
        return function["parameters"].get("arg_2")
    inner = [p for p in function["parameters"].values() if isinstance(p, dict)]
    return environment_default(inner[0]) if inner else None


def test_main_wires_every_module_file() -> None:
    main = parsed(INFRA / "main.bicep")
    used = {entry["detail"]["path"] for entry in main["modules"].values()}
    used |= {f"modules/{entry['detail']['path']}" for entry in module("keyvault.bicep")["modules"].values()}
    on_disk = {str(p.relative_to(INFRA)) for p in MODULES.glob("*.bicep")}
    assert used == on_disk


# ---------------------------------------------------------------------------------------------------- posture


def test_storage_accepts_only_entra_over_tls12_https() -> None:
    account = single(module("storage.bicep"), "Microsoft.Storage/storageAccounts")["properties"]
    assert account["allowSharedKeyAccess"] is False
    assert account["supportsHttpsTrafficOnly"] is True
    assert account["minimumTlsVersion"] in ("TLS1_2", "TLS1_3")
    assert account["allowBlobPublicAccess"] is False
    assert account["defaultToOAuthAuthentication"] is True
    container = single(module("storage.bicep"), "Microsoft.Storage/storageAccounts/blobServices/containers")
    assert container["properties"]["publicAccess"] == "None"


def test_inventory_tables_follow_the_prefix() -> None:
    tables = resources_of_type(module("storage.bicep"), "Microsoft.Storage/storageAccounts/tableServices/tables")
    names = {resource_body(t)["name"] for t in tables.values()}
    assert names == {"${tablePrefix}Transactions", "${tablePrefix}Certificates"}
    main = parsed(INFRA / "main.bicep")
    assert param_default(main, "scepTablePrefix") == "scep"
    assert main["modules"]["storage"]["config"]["params"]["tablePrefix"] == "scepTablePrefix"


def test_key_vault_is_rbac_only_and_unpurgeable() -> None:
    vault = single(module("keyvault.bicep"), "Microsoft.KeyVault/vaults")["properties"]
    assert vault["enableRbacAuthorization"] is True
    assert vault["enableSoftDelete"] is True
    assert vault["enablePurgeProtection"] is True
    assert vault["softDeleteRetentionInDays"] >= 7
    assert "accessPolicies" not in vault
    main = parsed(INFRA / "main.bicep")
    assert param_default(main, "keyVaultSku") == "premium"
    assert set(allowed_values(main, "keyVaultSku")) == {"premium", "standard"}


def test_telemetry_requires_entra() -> None:
    monitoring = module("monitoring.bicep")
    insights = single(monitoring, "Microsoft.Insights/components")["properties"]
    assert insights["DisableLocalAuth"] is True
    assert insights["WorkspaceResourceId"]
    workspace = single(monitoring, "Microsoft.OperationalInsights/workspaces")["properties"]
    assert workspace["features"]["disableLocalAuth"] is True


def test_function_app_is_flex_consumption_python_with_user_assigned_identity() -> None:
    app = module("function-app.bicep")
    plan = single(app, "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True

    site = single(app, "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    properties = site["properties"]
    assert properties["httpsOnly"] == "httpsOnly"
    assert properties["keyVaultReferenceIdentity"] == "identityId"
    assert properties["siteConfig"]["minTlsVersion"] in ("1.2", "1.3")

    config = properties["functionAppConfig"]
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"] == {"type": "UserAssignedIdentity", "userAssignedIdentityResourceId": "identityId"}
    assert config["runtime"]["name"] == "python"
    assert config["runtime"]["version"] == "pythonVersion"
    assert param_default(parsed(INFRA / "main.bicep"), "pythonVersion") == "3.12"
    assert {"maximumInstanceCount", "instanceMemoryMB", "triggers"} <= set(config["scaleAndConcurrency"])


def test_publishing_passwords_are_off() -> None:
    policies = resources_of_type(module("function-app.bicep"), "Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    bodies = [resource_body(p) for p in policies.values()]
    assert {b["name"]: b["properties"]["allow"] for b in bodies} == {"ftp": False, "scm": False}


def role_assignments() -> dict[tuple[str, str], set[str]]:
    """(principal, scope resource type) -> role definition ids, over every module."""
    found: dict[tuple[str, str], set[str]] = {}
    for path in bicep_files():
        doc = parsed(path)
        for name, resource in resources_of_type(doc, "Microsoft.Authorization/roleAssignments").items():
            body = resource_body(resource)
            principal = PRINCIPAL_PARAMS.get(body["properties"]["principalId"])
            assert principal, f"{path.name}:{name} assigns to an unexpected principal"
            scope = doc["resources"][body["scope"]]["type"]
            role_refs = role_ids_of(resource, body, doc)
            found.setdefault((principal, scope), set()).update(role_refs)
    return found


def role_ids_of(resource: dict[str, Any], body: dict[str, Any], doc: dict[str, Any]) -> set[str]:
    """Built-in role ids, or custom:<symbolic name> for a role definition of the same file."""
    function = body["properties"]["roleDefinitionId"]["function"]
    assert function["type"] == "subscription_resource_id"
    assert function["parameters"]["resource_type"] == "Microsoft.Authorization/roleDefinitions"
    loop = resource["config"].get("loop_type")
    name = function["parameters"]["resource_name_1"]
    if loop is None and isinstance(name, dict):
        accessed = name["operator"]["operands"]
        assert accessed["operand_2"] == "name", name
        assert doc["resources"][accessed["operand_1"]]["type"] == "Microsoft.Authorization/roleDefinitions"
        return {f"custom:{accessed['operand_1']}"}
    if loop is None:
        return {resolve(name, doc)}
    assert function["parameters"]["resource_name_1"] == loop["detail"]["item_name"]
    return set(array_items(loop["detail"]["array_name"], doc))


def test_role_assignments_are_exactly_the_intended_ones() -> None:
    assert role_assignments() == INTENDED_ROLES


def test_the_ra_renewal_role_allows_exactly_the_writes_renewal_makes() -> None:
    keyvault = module("keyvault.bicep")
    role = single(keyvault, "Microsoft.Authorization/roleDefinitions")
    properties = role["properties"]
    assert properties["type"] == "CustomRole"
    assert "${name}" in properties["roleName"], "role names are unique per tenant: the vault name makes it so"
    (permission,) = properties["permissions"]
    assert permission["actions"] == [] and permission["notActions"] == [] and permission["notDataActions"] == []
    assert set(array_items(permission["dataActions"], keyvault)) == RA_RENEWAL_DATA_ACTIONS
    (assignable,) = properties["assignableScopes"]
    assert assignable["operator"]["operands"]["operand_1"]["function"]["type"] == "resource_group"


def test_the_app_can_neither_delete_nor_export_nor_import() -> None:
    granted = " ".join(RA_RENEWAL_DATA_ACTIONS)
    for verb in ("delete", "purge", "import", "backup", "restore", "keys/create", "release", "*"):
        assert verb not in granted, verb
    identity_roles = INTENDED_ROLES[("identity", "Microsoft.KeyVault/vaults")]
    for officer in ("Key Vault Certificates Officer", "Key Vault Crypto Officer", "Key Vault Secrets Officer"):
        assert ROLE[officer] not in identity_roles, officer


def test_principal_ids_reach_the_modules_from_the_right_source() -> None:
    main = parsed(INFRA / "main.bicep")
    identity_principal = {
        "operator": {
            "type": "property_accessor",
            "operands": {
                "operand_1": "identity",
                "operand_2": {
                    "operator": {
                        "type": "property_accessor",
                        "operands": {"operand_1": "properties", "operand_2": "principalId"},
                    }
                },
            },
        }
    }
    for name, entry in main["modules"].items():
        params = entry["config"].get("params") or entry["config"]["config"]["params"]
        if "identityPrincipalId" in params:
            assert params["identityPrincipalId"] == identity_principal, name
        if "deployerPrincipalId" in params:
            assert params["deployerPrincipalId"] == "deployerPrincipalId", name
    assert param_default(main, "deployerPrincipalId") == ""


def test_deployer_roles_vanish_without_a_deployer() -> None:
    keyvault = module("keyvault.bicep")
    roles = keyvault["variables"]["deployerRoles"]["value"]["operator"]
    assert roles["type"] == "conditional"
    assert roles["operands"]["condition"]["function"] == {
        "type": "empty",
        "parameters": {"item_to_test": "deployerPrincipalId"},
    }
    assert roles["operands"]["true_value"] == []


def test_deployer_writes_secrets_only_when_asked() -> None:
    keyvault = module("keyvault.bicep")
    with_deployer = keyvault["variables"]["deployerRoles"]["value"]["operator"]["operands"]["false_value"]
    always, optional = with_deployer["function"]["parameters"].values()
    assert set(array_items(always, keyvault)) == {
        ROLE["Key Vault Certificates Officer"],
        ROLE["Key Vault Crypto Officer"],
    }
    assert optional == "deployerSecretRoles"
    choice = keyvault["variables"]["deployerSecretRoles"]["value"]["operator"]["operands"]
    assert choice["condition"] == "deployerWritesSecrets"
    assert array_items(choice["true_value"], keyvault) == [ROLE["Key Vault Secrets Officer"]]
    assert choice["false_value"] == []
    main = parsed(INFRA / "main.bicep")
    assert param_default(main, "deployerWritesSecrets") is False
    # Static modes: the hook creates the challenge as the deployer, who also reads it to configure devices.
    asked = main["modules"]["keyVault"]["config"]["params"]["deployerWritesSecrets"]["operator"]
    assert asked["type"] == "or"
    assert asked["operands"] == {"operand_1": "deployerWritesSecrets", "operand_2": "staticChallengeEnabled"}


def test_no_app_role_grant_is_made_by_the_deployment() -> None:
    # A Graph grant to a principal created in the same deployment fails at random with "Not a valid reference
    # update" (msgraph-bicep-types issue 193): the post-provision hook grants instead, waiting out replication.
    for path in bicep_files():
        assert not resources_of_type(parsed(path), "Microsoft.Graph/appRoleAssignedTo"), path.name


def test_the_grant_command_grants_the_two_intune_app_roles() -> None:
    from scep.azure.intune.grant import INTUNE_ROLES

    assert {(app_id, role_id) for app_id, role_id, _ in INTUNE_ROLES} == {
        (INTUNE_API_APP_ID, SCEP_CHALLENGE_PROVIDER),
        (MICROSOFT_GRAPH_APP_ID, APPLICATION_READ_ALL),
    }


def test_federated_credential_trusts_the_user_assigned_identity() -> None:
    graph = module("intune-application.bicep")
    application = graph["resources"]["application"]
    body = resource_body(application)
    # pycep lists an unconditional nested resource as "<parent>__<child>", with the parent's type in front.
    credential = graph["resources"]["application__identityCredential"]
    assert credential["type"] == "Microsoft.Graph/applications/federatedIdentityCredentials@v1.0"
    credential_body = resource_body(credential)
    assert credential_body["audiences"] == ["api://AzureADTokenExchange"]
    assert credential_body["subject"] == "identityPrincipalId"
    assert credential_body["issuer"].endswith("${tenant().tenantId}/v2.0")
    assert "passwordCredentials" not in body and "keyCredentials" not in body
    requested = {
        (resolve(access["resourceAppId"], graph), resolve(role["id"], graph), role["type"])
        for access in body["requiredResourceAccess"]
        for role in access["resourceAccess"]
    }
    assert requested == {
        (INTUNE_API_APP_ID, SCEP_CHALLENGE_PROVIDER, "Role"),
        (MICROSOFT_GRAPH_APP_ID, APPLICATION_READ_ALL, "Role"),
    }


def test_grants_are_optional_and_off_by_default() -> None:
    main = parsed(INFRA / "main.bicep")
    assert param_default(main, "grantIntunePermissions") is False
    assert main["modules"]["intuneApplication"]["config"]["condition"] == "createApplication"
    assert "grantIntunePermissions" in json.dumps(main["variables"]["createApplication"])
    assert main["outputs"]["SCEP_GRANT_INTUNE_PERMISSIONS"]["value"] == "grantIntunePermissions"
    commands = "\n".join(flatten_strings("permissionCommands", main))
    assert SCEP_CHALLENGE_PROVIDER in commands and APPLICATION_READ_ALL in commands
    assert INTUNE_API_APP_ID in commands and MICROSOFT_GRAPH_APP_ID in commands
    assert "appRoleAssignments" in commands


def keys_anywhere(value: Any) -> set[str]:
    """Every object key in a parsed document, at any depth."""
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in keys_anywhere(item)}
    if isinstance(value, list):
        return {key for item in value for key in keys_anywhere(item)}
    return set()


def test_no_ftps_state_on_the_flex_site() -> None:
    # ARM rejects siteConfig.ftpsState on Flex Consumption sites ("Flex Consumption plan deprecations").
    site = single(module("function-app.bicep"), "Microsoft.Web/sites")
    assert "ftpsState" not in keys_anywhere(site)
    for path in bicep_files():
        assert "ftpsState" not in path.read_text(), path.name
    policies = resources_of_type(module("function-app.bicep"), "Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    assert {resource_body(p)["name"]: resource_body(p)["properties"]["allow"] for p in policies.values()} == {
        "ftp": False,
        "scm": False,
    }


def test_deployer_role_assignments_carry_no_principal_type() -> None:
    # A service principal running azd in CI would get UnmatchedPrincipalType with a fixed 'User'.
    keyvault = module("keyvault.bicep")
    deployer = resource_body(keyvault["resources"]["deployerRoleAssignments"])
    assert "principalType" not in deployer["properties"]
    assert "deployerPrincipalType" not in parsed(INFRA / "main.bicep")["parameters"]
    assert "AZURE_PRINCIPAL_TYPE" not in (INFRA / "main.bicepparam").read_text()


def test_no_queue_role_and_no_queue_endpoint() -> None:
    # An HTTP-only app uses no host queues.
    for path in bicep_files():
        text = path.read_text()
        assert ROLE["Storage Queue Data Contributor"] not in text, path.name
        assert "queueServiceUri" not in text and "queueEndpoint" not in text, path.name


def test_zone_redundancy_asks_for_the_two_billed_always_ready_instances() -> None:
    app = module("function-app.bicep")
    chosen = app["variables"]["alwaysReadyHttpInstances"]["value"]["operator"]["operands"]
    assert chosen["condition"] == "zoneRedundant"
    assert chosen["true_value"] == {
        "function": {"type": "max", "parameters": {"arg_1": 2, "arg_2": "alwaysReadyInstances"}}
    }
    assert chosen["false_value"] == "alwaysReadyInstances"
    site = single(app, "Microsoft.Web/sites")
    always_ready = json.dumps(site["properties"]["functionAppConfig"]["scaleAndConcurrency"]["alwaysReady"])
    assert "alwaysReadyHttpInstances" in always_ready and '"alwaysReadyInstances"' not in always_ready
    description = json.dumps(parsed(INFRA / "main.bicep")["parameters"]["zoneRedundant"]["decorators"])
    assert "two always-ready" in description and "billed" in description


def test_https_only_is_a_parameter_defaulting_to_true() -> None:
    main = parsed(INFRA / "main.bicep")
    assert param_default(main, "httpsOnly") is True
    assert main["modules"]["functionApp"]["config"]["params"]["httpsOnly"] == "httpsOnly"
    assert single(module("function-app.bicep"), "Microsoft.Web/sites")["properties"]["httpsOnly"] == "httpsOnly"


def test_hooks_use_the_identity_azd_deployed_with() -> None:
    shell = (INFRA / "scripts" / "postprovision.sh").read_text()
    powershell = (INFRA / "scripts" / "postprovision.ps1").read_text()
    assert 'SCEP_AZURE_CREDENTIAL="${SCEP_AZURE_CREDENTIAL:-azd}"' in shell
    assert "$env:SCEP_AZURE_CREDENTIAL = 'azd'" in powershell
    for script in (shell, powershell):
        assert not re.search(r"^\s*az\s", script, flags=re.M), "no az call: az may be signed in as someone else"
        assert "intune grant" in script


# ---------------------------------------------------------------------------------------------------- monitoring

# The app's OpenTelemetry instruments, as they appear in customMetrics.name.
METRICS = {
    "scep.enrollments",
    "scep.keyvault.duration",
    "scep.keyvault.throttled",
    "scep.keyvault.retries",
    "scep.intune.duration",
    "scep.intune.failures",
    "scep.ca.days_to_expiry",
    "scep.ra.days_to_expiry",
}
METRIC_NAME = re.compile(r'"(scep\.[a-z_.]+)"')


def observability() -> dict[str, Any]:
    return module("observability.bicep")


def workbook_queries() -> dict[str, str]:
    content = json.loads((INFRA / "workbook.json").read_text())
    return {item["name"]: item["content"]["query"] for item in content["items"] if item["type"] == 3}


def alert_definitions() -> dict[str, dict[str, Any]]:
    doc = observability()
    return {alert["key"]: alert for alert in doc["variables"]["alerts"]["value"]}


def test_the_workbook_opens_on_the_app_insights_component() -> None:
    doc = observability()
    workbook = single(doc, "Microsoft.Insights/workbooks")
    assert workbook["kind"] == "shared"
    properties = workbook["properties"]
    assert properties["sourceId"] == "applicationInsightsId" and properties["category"] == "workbook"
    content = properties["serializedData"]["function"]["parameters"]["value_to_convert"]["function"]["parameters"]
    assert content["arg_1"]["function"]["parameters"]["file_path"] == "../workbook.json"
    assert content["arg_2"] == {"fallbackResourceIds": ["applicationInsightsId"]}
    main = parsed(INFRA / "main.bicep")
    wired = main["modules"]["observability"]["config"]["params"]["applicationInsightsId"]
    assert wired["operator"]["operands"]["operand_1"] == "monitoring"
    outputs = module("monitoring.bicep")["outputs"]
    assert outputs["applicationInsightsId"]["value"] == {
        "operator": {"type": "property_accessor", "operands": {"operand_1": "applicationInsights", "operand_2": "id"}}
    }


def test_the_workbook_charts_every_metric_and_the_server_errors() -> None:
    queries = workbook_queries()
    named = {name for query in queries.values() for name in METRIC_NAME.findall(query)}
    assert named == METRICS, "exactly the app's instruments, spelled as the app emits them"
    assert {"outcome", "fail_info", "operation", "call", "code"} <= {
        dimension for query in queries.values() for dimension in re.findall(r'customDimensions\["(\w+)"\]', query)
    }
    assert any(query.startswith("requests") and "resultCode" in query for query in queries.values())
    content = json.loads((INFRA / "workbook.json").read_text())
    assert content["version"] == "Notebook/1.0"


def test_each_alert_watches_what_it_says() -> None:
    alerts = alert_definitions()
    assert set(alerts) == {"expiry", "intune", "throttling", "server-errors"}
    expiry = alerts["expiry"]
    assert set(METRIC_NAME.findall(expiry["query"])) == {"scep.ca.days_to_expiry", "scep.ra.days_to_expiry"}
    assert (expiry["operator"], expiry["threshold"], expiry["aggregation"]) == (
        "LessThanOrEqual", "expiryAlertDays", "Minimum"
    )
    assert param_default(observability(), "expiryAlertDays") == 30
    assert METRIC_NAME.findall(alerts["intune"]["query"]) == ["scep.intune.failures"]
    assert METRIC_NAME.findall(alerts["throttling"]["query"]) == ["scep.keyvault.throttled"]
    assert alerts["server-errors"]["query"].startswith("requests") and "500 .. 599" in alerts["server-errors"]["query"]
    for key, alert in alerts.items():
        assert alert["measure"] in alert["query"], key
        if alert["dimension"]:
            assert f"by {alert['dimension']}" in alert["query"], key
        assert key not in ("intune", "throttling", "server-errors") or (alert["operator"], alert["threshold"]) == (
            "GreaterThan", 0
        ), key


def test_alert_rules_query_the_component_and_notify_only_when_an_email_is_given() -> None:
    doc = observability()
    rules = resources_of_type(doc, "Microsoft.Insights/scheduledQueryRules")
    (rule,) = rules.values()
    assert rule["config"]["loop_type"]["detail"]["array_name"] == "alerts"
    body = resource_body(rule)
    assert body["kind"] == "LogAlert"
    assert body["properties"]["scopes"] == ["applicationInsightsId"]
    assert body["properties"]["actions"] == "alertActions"
    chosen = doc["variables"]["alertActions"]["value"]["actionGroups"]["operator"]["operands"]
    assert chosen["condition"]["function"] == {"type": "empty", "parameters": {"item_to_test": "alertEmail"}}
    assert chosen["true_value"] == []
    assert chosen["false_value"][0]["operator"]["operands"]["operand_1"] == "actionGroup"
    group = resources_of_type(doc, "Microsoft.Insights/actionGroups")["actionGroup"]
    assert group["config"]["condition"]["operator"]["operands"]["bool_value"]["function"]["parameters"] == {
        "item_to_test": "alertEmail"
    }
    (receiver,) = resource_body(group)["properties"]["emailReceivers"]
    assert receiver["emailAddress"] == "alertEmail"
    main = parsed(INFRA / "main.bicep")
    assert param_default(main, "alertEmail") == ""
    assert main["modules"]["observability"]["config"]["params"]["alertEmail"] == "alertEmail"


# ---------------------------------------------------------------------------------------------------- settings


def app_settings() -> dict[str, Any]:
    site = single(module("function-app.bicep"), "Microsoft.Web/sites")
    entries = site["properties"]["siteConfig"]["appSettings"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), "an app setting is set twice"
    return {entry["name"]: entry["value"] for entry in entries}


def product_settings() -> tuple[set[str], set[str]]:
    """(settings the app needs in Azure, every setting the app knows), from the composition root."""
    from scep.config import SETTINGS

    return {s.name for s in SETTINGS if s.azure}, {s.name for s in SETTINGS}


def test_every_setting_the_app_needs_is_provisioned() -> None:
    needed, _ = product_settings()
    missing = (needed | HOST_SETTINGS) - set(app_settings())
    assert not missing, f"app settings missing from infra/modules/function-app.bicep: {sorted(missing)}"


def test_no_unknown_product_setting_is_provisioned() -> None:
    _, known = product_settings()
    unknown = {name for name in app_settings() if PRODUCT_SETTING.match(name)} - known
    assert not unknown, f"app settings the code does not read: {sorted(unknown)}"


def test_flex_consumption_settings_are_absent() -> None:
    assert not FORBIDDEN_ON_FLEX & set(app_settings())
    assert "AzureWebJobsStorage" not in app_settings(), "a connection string would need a shared key"


def test_identity_based_settings_use_the_user_assigned_identity() -> None:
    settings = app_settings()
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    assert settings["AZURE_CLIENT_ID"] == "identityClientId"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "ClientId=${identityClientId};Authorization=AAD"
    assert settings["SCEP_STORE"] == "tables"
    assert settings["SCEP_TABLES_ENDPOINT"] == settings["AzureWebJobsStorage__tableServiceUri"] == "tableEndpoint"


def test_no_setting_is_a_key_vault_reference() -> None:
    # An unresolved reference leaves its own text as the value; the app reads its secrets by name instead.
    assert "SCEP_CHALLENGE" not in app_settings()
    for path in bicep_files():
        assert "@Microsoft.KeyVault" not in path.read_text(), path.name
    assert app_settings()["SCEP_CHALLENGE_SECRET_NAME"] == "staticChallengeSecretName"


def test_the_static_challenge_survives_redeployment() -> None:
    main = parsed(INFRA / "main.bicep")
    secure = {name for name, p in main["parameters"].items() if any(d["type"] == "secure" for d in p["decorators"])}
    assert secure == {"staticChallenge", "intuneClientSecret", "webhookSecret"}
    assert "newGuid" not in "".join(p.read_text() for p in bicep_files()), "a value generated per deployment"
    stored = main["modules"]["keyVault"]["config"]["params"]["staticChallenge"]["operator"]["operands"]
    assert stored == {"condition": "staticChallengeEnabled", "true_value": "staticChallenge", "false_value": ""}
    assert param_default(main, "staticChallenge") == ""
    keyvault = module("keyvault.bicep")
    writer = keyvault["modules"]["staticChallengeSecret"]["config"]
    assert writer["condition"] == {"operator": {"type": "not", "operands": {"bool_value": {
        "function": {"type": "empty", "parameters": {"item_to_test": "staticChallenge"}}}}}}
    function_app_params = main["modules"]["functionApp"]["config"]["params"]
    assert not secure & set(flatten_strings(function_app_params, main)), "a secret flows into app settings"


def test_defaults_match_the_documented_ones() -> None:
    main = parsed(INFRA / "main.bicep")
    assert param_default(main, "scepCaCertName") == "scep-ca"
    assert param_default(main, "scepRaCertName") == "scep-ra"
    assert param_default(main, "scepChallengeMode") == "intune"
    assert allowed_values(main, "scepChallengeMode") == ["intune", "static", "static,intune"]
    assert param_default(main, "scepCertValidityDays") == 365
    assert param_default(main, "intuneAuth") == "managed-identity"
    assert set(allowed_values(main, "intuneAuth")) == {"managed-identity", "federated", "secret"}
    assert param_default(main, "webhookSecretName") == ""


def test_outputs_for_the_intune_profiles() -> None:
    outputs = parsed(INFRA / "main.bicep")["outputs"]
    assert outputs["SCEP_SERVER_URL"]["value"] == "${appBaseUrl}/scep"
    assert outputs["SCEP_CA_DOWNLOAD_URL"]["value"] == "${appBaseUrl}/ca.pem"
    base = resolve("appBaseUrl", parsed(INFRA / "main.bicep"))
    assert base == "https://${functionApp.outputs.defaultHostName}/api"
    expected = {
        "AZURE_FUNCTION_APP_NAME",
        "KEY_VAULT_URL",
        "SCEP_IDENTITY_CLIENT_ID",
        "SCEP_IDENTITY_PRINCIPAL_ID",
        "AZURE_RESOURCE_GROUP",
        "INTUNE_PERMISSION_COMMANDS",
    }
    assert expected <= set(outputs)


# ---------------------------------------------------------------------------------------------------- checkov


def checkov_command() -> list[str]:
    explicit = os.environ.get("CHECKOV")
    if explicit:
        return [explicit]
    beside_python = Path(sys.executable).with_name("checkov")
    for candidate in (shutil.which("checkov"), str(beside_python) if beside_python.exists() else None):
        if candidate:
            return [candidate]
    pytest.fail(
        "checkov not found. Install it in its own virtual environment (it pins old packaging and pycep), "
        "e.g. `python -m venv /opt/checkov && /opt/checkov/bin/pip install checkov`, "
        "then set CHECKOV=/opt/checkov/bin/checkov"
    )


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    environment = dict(os.environ, CKV_SKIP_PACKAGE_UPDATE_CHECK="true", BC_SKIP_MAPPING="TRUE")
    completed = subprocess.run(
        [*checkov_command(), "--framework", "bicep", "--skip-download", "--compact", "-o", "json", "-d", str(INFRA)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
        check=False,
    )
    assert completed.returncode in (0, 1), completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_finds_no_failed_check(checkov_report: dict[str, Any]) -> None:
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in checkov_report["results"]["failed_checks"]]
    assert not failed, "\n".join(failed)
    assert checkov_report["summary"]["passed"] > 0


def test_checkov_skips_are_each_justified(checkov_report: dict[str, Any]) -> None:
    for check in checkov_report["results"]["skipped_checks"]:
        reason = check["check_result"].get("suppress_comment", "")
        assert len(reason) > 20 and reason != "No comment provided", check["check_id"]


def test_checkov_parses_everything_but_the_graph_module(checkov_report: dict[str, Any]) -> None:
    # checkov pins pycep-parser 0.5.1, which has no `extension` statement: it cannot read the Graph modules.
    # That module holds only Microsoft.Graph resources, for which checkov has no checks; the pycep tests above
    # parse it with a current pycep.
    unparsed = {Path(p).name for p in checkov_report["results"]["parsing_errors"]}
    assert unparsed <= {"intune-application.bicep", "admin-application.bicep"}


# ---------------------------------------------------------------------------------------------------- postprovision

FAKE_SCEP = """#!/bin/sh
# Records each call (and the credential choice) and keeps the CA/RA state in files, printing inventory lines like
# `scep ca show` does. While $STATE/forbidden holds a positive number, `ca show` answers like a vault whose role
# assignment has not propagated yet (HTTP 403) and counts down.
echo "scep $* KEY_VAULT_URL=$KEY_VAULT_URL CA=$SCEP_CA_CERT_NAME" >> "$CALLS"
echo "$SCEP_AZURE_CREDENTIAL" > "$STATE/credential"
case "$1 $2" in
  "ca show")
    left=$(cat "$STATE/forbidden" 2>/dev/null || echo 0)
    if [ "$left" -gt 0 ]; then
      echo $((left - 1)) > "$STATE/forbidden"
      echo "error: Key Vault list versions of scep-ca failed (HTTP 403): Forbidden" >&2; exit 1
    fi
    [ -f "$STATE/ca" ] || { echo "no CA in Key Vault $KEY_VAULT_URL: run scep ca init" >&2; exit 1; }
    echo "[ca] CN=Test CA"
    [ -f "$STATE/ra" ] && echo "[ra] CN=Test RA"
    exit 0 ;;
  "ca init") touch "$STATE/ca" "$STATE/ra" ;;
  "ca ra") touch "$STATE/ra" ;;
esac
"""
FAKE_AZ = """#!/bin/sh
echo "az $*" >> "$CALLS"
"""


def run_postprovision(tmp_path: Path, **environment: str) -> list[str]:
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    for name, text in (("scep", FAKE_SCEP), ("az", FAKE_AZ)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CALLS": str(calls),
        "STATE": str(tmp_path),
        "KEY_VAULT_URL": "https://kv-scep-abc.vault.azure.net/",
        "SCEP_VAULT_WAIT_SECONDS": "0",
        **environment,
    }
    script = INFRA / "scripts" / "postprovision.sh"
    subprocess.run(["sh", str(script)], env=env, check=True, capture_output=True, timeout=60)
    return calls.read_text().splitlines()


URL_AND_NAME = "KEY_VAULT_URL=https://kv-scep-abc.vault.azure.net/ CA=scep-ca"


def test_postprovision_creates_ca_and_ra_once(tmp_path: Path) -> None:
    first = run_postprovision(tmp_path, SCEP_CA_SUBJECT="CN=Contoso Device CA,O=Contoso", SCEP_CA_KEY_TYPE="RSA")
    url = URL_AND_NAME
    assert first == [
        f"scep ca show {url}",
        f"scep ca init --subject CN=Contoso Device CA,O=Contoso --key-type RSA --hsm {url}",
        f"scep ca show {url}",
    ]
    second = run_postprovision(tmp_path)
    assert [c for c in second if c.startswith("scep")] == [f"scep ca show {url}"]


def test_postprovision_issues_only_a_missing_ra(tmp_path: Path) -> None:
    (tmp_path / "ca").touch()
    calls = [c for c in run_postprovision(tmp_path) if c.startswith("scep")]
    assert calls == [f"scep ca show {URL_AND_NAME}", f"scep ca ra issue {URL_AND_NAME}", f"scep ca show {URL_AND_NAME}"]


def test_postprovision_uses_software_keys_on_a_standard_vault(tmp_path: Path) -> None:
    calls = run_postprovision(tmp_path, KEY_VAULT_SKU="standard", SCEP_CA_CERT_NAME="corp-ca")
    init = next(c for c in calls if c.startswith("scep ca init"))
    assert "--hsm" not in init and init.endswith("CA=corp-ca")


def test_postprovision_uses_azds_identity_and_waits_for_the_vault_role_with_it(tmp_path: Path) -> None:
    (tmp_path / "forbidden").write_text("2")
    calls = run_postprovision(tmp_path)
    assert not [c for c in calls if c.startswith("az ")], "az may be signed in as someone else, or not at all"
    assert [c for c in calls if c.startswith("scep ca")][:4] == [f"scep ca show {URL_AND_NAME}"] * 3 + [
        f"scep ca init --hsm {URL_AND_NAME}"
    ]
    assert (tmp_path / "credential").read_text().strip() == "azd"
    run_postprovision(tmp_path, SCEP_AZURE_CREDENTIAL="default")
    assert (tmp_path / "credential").read_text().strip() == "default"


def test_postprovision_grants_the_intune_roles_when_asked(tmp_path: Path) -> None:
    assert not [c for c in run_postprovision(tmp_path) if "intune grant" in c]
    identity = {"SCEP_GRANT_INTUNE_PERMISSIONS": "true", "SCEP_IDENTITY_PRINCIPAL_ID": "principal-1"}
    calls = run_postprovision(tmp_path, INTUNE_AUTH="managed-identity", **identity)
    assert f"scep intune grant --principal-id principal-1 {URL_AND_NAME}" in calls
    calls = run_postprovision(tmp_path, INTUNE_AUTH="federated", INTUNE_CLIENT_ID="app-1", **identity)
    assert f"scep intune grant --client-id app-1 {URL_AND_NAME}" in calls


def test_postprovision_creates_the_static_challenge_once_in_static_modes_only(tmp_path: Path) -> None:
    assert not [c for c in run_postprovision(tmp_path) if "challenge" in c], "intune mode stores no challenge"
    calls = run_postprovision(
        tmp_path, SCEP_CHALLENGE_SECRET_NAME="scep-challenge", SCEP_GRANT_INTUNE_PERMISSIONS="true",
        SCEP_IDENTITY_PRINCIPAL_ID="principal-1",
    )
    scep_calls = [c.split(" KEY_VAULT_URL")[0] for c in calls if c.startswith("scep")]
    assert scep_calls[-2:] == ["scep challenge init", "scep intune grant --principal-id principal-1"]
    assert "--show" not in " ".join(calls), "the hook never prints the challenge"
    powershell = (INFRA / "scripts" / "postprovision.ps1").read_text()
    assert "& $scep challenge init" in powershell and "SCEP_CHALLENGE_SECRET_NAME" in powershell


def test_postprovision_stops_on_a_vault_error_other_than_403(tmp_path: Path) -> None:
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "scep").write_text('#!/bin/sh\necho "scep $*" >> "$CALLS"\necho "error: HTTP 401" >&2; exit 1\n')
    (broken / "scep").chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": f"{broken}:/usr/bin:/bin", "HOME": str(tmp_path), "CALLS": str(calls),
           "KEY_VAULT_URL": "https://kv-scep-abc.vault.azure.net/"}
    completed = subprocess.run(["sh", str(INFRA / "scripts" / "postprovision.sh")], env=env, capture_output=True,
                               timeout=60, check=False)
    assert completed.returncode != 0 and b"HTTP 401" in completed.stderr
    assert calls.read_text().splitlines() == ["scep ca show"], "no CA is created after an unexplained error"


def test_postprovision_needs_the_vault_url(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failure:
        run_postprovision(tmp_path, KEY_VAULT_URL="")
    assert b"KEY_VAULT_URL" in failure.value.stderr
