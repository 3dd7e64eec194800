#!/usr/bin/env bash
# Creates the SCEP CA and RA certificates in the deployed Key Vault, once (`scep ca init` issues both); in static
# challenge modes (SCEP_CHALLENGE_SECRET_NAME set) creates the challenge secret with a random value when the vault
# has none (`scep challenge init`, which never replaces it, so devices keep working across redeployments); then,
# with SCEP_GRANT_INTUNE_PERMISSIONS=true, grants the Intune app roles (`scep intune grant`, which waits out
# Entra's replication of a principal created by the deployment).
# Run by `azd up` / `azd provision` after the infrastructure exists (azd exports the Bicep outputs), or by hand:
#   KEY_VAULT_URL=https://kv-scep-xxxx.vault.azure.net/ infra/scripts/postprovision.sh
# Idempotent: when `scep ca show` finds the CA, nothing is created (only a missing RA is issued).
#
# Identity: every Azure call is made as the account azd signed in (SCEP_AZURE_CREDENTIAL=azd), which is the
# deployer the Bicep gave the vault roles to; whatever `az` is signed in as plays no part. Set
# SCEP_AZURE_CREDENTIAL=default to use DefaultAzureCredential instead (e.g. a CI service principal's environment).
#
# Optional environment (e.g. `azd env set SCEP_CA_SUBJECT "CN=Contoso Device CA,O=Contoso"`):
#   SCEP_CA_SUBJECT, SCEP_CA_DAYS, SCEP_CA_KEY_TYPE (RSA|EC), SCEP_CA_KEY_SIZE (2048|3072|4096), SCEP_CA_CURVE
#   (P-256|P-384), SCEP_CLI (path of the scep command), KEY_VAULT_SKU (premium: keys in HSMs, passes --hsm).
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi  # azd runs posix hooks with sh
set -euo pipefail

: "${KEY_VAULT_URL:?KEY_VAULT_URL is not set: it is an output of infra/main.bicep}"
export KEY_VAULT_URL
export SCEP_AZURE_CREDENTIAL="${SCEP_AZURE_CREDENTIAL:-azd}"
export SCEP_CA_CERT_NAME="${SCEP_CA_CERT_NAME:-scep-ca}"
export SCEP_RA_CERT_NAME="${SCEP_RA_CERT_NAME:-scep-ra}"

repo_root="$(cd "$(dirname "$0")/../.." && pwd)"

find_scep() {
    if [ -n "${SCEP_CLI:-}" ]; then echo "$SCEP_CLI"; return; fi
    if command -v scep >/dev/null 2>&1; then command -v scep; return; fi
    if [ -x "$repo_root/.venv/bin/scep" ]; then echo "$repo_root/.venv/bin/scep"; return; fi
    echo "Installing the scep command into $repo_root/.venv" >&2
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        { echo "Python 3.11 or newer is needed for the scep command" >&2; exit 1; }
    python3 -m venv "$repo_root/.venv"
    "$repo_root/.venv/bin/pip" install --quiet "$repo_root" >&2
    echo "$repo_root/.venv/bin/scep"
}

# Role assignments made by the deployment can take minutes to reach Key Vault: while the vault refuses this
# identity (HTTP 403), wait and ask again. Prints the inventory and returns 0 when a CA exists, returns 1 when
# there is none, and 2 on any other error (after saying it).
read_inventory() {
    local scep="$1" attempts="${SCEP_VAULT_WAIT_ATTEMPTS:-20}" output
    for attempt in $(seq 1 "$attempts"); do
        if output="$("$scep" ca show 2>&1)"; then printf '%s\n' "$output"; return 0; fi
        case "$output" in
            *"no CA in"*) return 1 ;;
            *"HTTP 403"*)
                echo "Waiting for Key Vault access to propagate ($attempt/$attempts)..." >&2
                sleep "${SCEP_VAULT_WAIT_SECONDS:-30}" ;;
            *) printf '%s\n' "$output" >&2; return 2 ;;
        esac
    done
    echo "Still no access to $KEY_VAULT_URL: is the deployer's Key Vault Certificates Officer role assigned?" >&2
    return 2
}

init_arguments() {
    [ -n "${SCEP_CA_SUBJECT:-}" ] && printf '%s\0' --subject "$SCEP_CA_SUBJECT"
    [ -n "${SCEP_CA_DAYS:-}" ] && printf '%s\0' --days "$SCEP_CA_DAYS"
    [ -n "${SCEP_CA_KEY_TYPE:-}" ] && printf '%s\0' --key-type "$SCEP_CA_KEY_TYPE"
    [ -n "${SCEP_CA_KEY_SIZE:-}" ] && printf '%s\0' --key-size "$SCEP_CA_KEY_SIZE"
    [ -n "${SCEP_CA_CURVE:-}" ] && printf '%s\0' --curve "$SCEP_CA_CURVE"
    [ "${KEY_VAULT_SKU:-premium}" = "premium" ] && printf '%s\0' --hsm
    return 0
}

# Static modes only (main.bicep outputs SCEP_CHALLENGE_SECRET_NAME empty in intune mode). The value is not
# printed: read it with `scep challenge init --show` (or from the vault) to configure devices.
create_challenge() {
    local scep="$1"
    [ -n "${SCEP_CHALLENGE_SECRET_NAME:-}" ] || return 0
    "$scep" challenge init
}

grant_intune_permissions() {
    local scep="$1"
    [ "${SCEP_GRANT_INTUNE_PERMISSIONS:-false}" = "true" ] || return 0
    if [ "${INTUNE_AUTH:-managed-identity}" = "managed-identity" ]; then
        "$scep" intune grant --principal-id "${SCEP_IDENTITY_PRINCIPAL_ID:?SCEP_IDENTITY_PRINCIPAL_ID is not set}"
    else
        "$scep" intune grant --client-id "${INTUNE_CLIENT_ID:?INTUNE_CLIENT_ID is not set}"
    fi
}

create_ca() {
    local scep="$1" inventory found=0
    inventory="$(read_inventory "$scep")" || found=$?
    [ "$found" -le 1 ] || exit 1
    if [ "$found" -eq 0 ]; then
        printf '%s\n' "$inventory"
        if printf '%s\n' "$inventory" | grep -q '^\[ra\]'; then
            echo "CA '$SCEP_CA_CERT_NAME' already exists in $KEY_VAULT_URL: nothing to create."
            return 0
        fi
        echo "The CA exists without an RA: issuing RA certificate '$SCEP_RA_CERT_NAME'"
        "$scep" ca ra issue
        "$scep" ca show
        return 0
    fi
    local arguments=()
    while IFS= read -r -d '' argument; do arguments+=("$argument"); done < <(init_arguments)
    echo "Creating CA '$SCEP_CA_CERT_NAME' and RA '$SCEP_RA_CERT_NAME' in $KEY_VAULT_URL"
    "$scep" ca init "${arguments[@]}"
    "$scep" ca show
}

main() {
    local scep
    scep="$(find_scep)"
    create_ca "$scep"
    create_challenge "$scep"
    grant_intune_permissions "$scep"
}

main "$@"
