#!/usr/bin/env bash
# Creates the SCEP CA and RA certificates in the deployed Key Vault, once (`scep ca init` issues both).
# Run by `azd up` / `azd provision` after the infrastructure exists (azd exports the Bicep outputs), or by hand:
#   KEY_VAULT_URL=https://kv-scep-xxxx.vault.azure.net/ infra/scripts/postprovision.sh
# Idempotent: when `scep ca show` finds the CA, nothing is created (only a missing RA is issued).
#
# Optional environment (e.g. `azd env set SCEP_CA_SUBJECT "CN=Contoso Device CA,O=Contoso"`):
#   SCEP_CA_SUBJECT, SCEP_CA_DAYS, SCEP_CA_KEY_TYPE (RSA|EC), SCEP_CA_KEY_SIZE (2048|3072|4096), SCEP_CA_CURVE
#   (P-256|P-384), SCEP_CLI (path of the scep command), KEY_VAULT_SKU (premium: keys in HSMs, passes --hsm).
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi  # azd runs posix hooks with sh
set -euo pipefail

: "${KEY_VAULT_URL:?KEY_VAULT_URL is not set: it is an output of infra/main.bicep}"
export KEY_VAULT_URL
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

# Role assignments made by the deployment can take minutes to reach Key Vault. With the az CLI at hand,
# wait until the signed-in identity may list certificates before touching the CA.
wait_for_vault_access() {
    command -v az >/dev/null 2>&1 || return 0
    local vault_name="${KEY_VAULT_URL#https://}"
    vault_name="${vault_name%%.*}"
    for attempt in $(seq 1 20); do
        if az keyvault certificate list --vault-name "$vault_name" --output none 2>/dev/null; then return 0; fi
        echo "Waiting for Key Vault access to propagate ($attempt/20)..." >&2
        sleep 30
    done
    echo "Still no access to $vault_name: is the deployer's Key Vault Certificates Officer role assigned?" >&2
    return 1
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

main() {
    local scep
    scep="$(find_scep)"
    wait_for_vault_access
    local inventory
    if inventory="$("$scep" ca show)"; then
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

main "$@"
