# Creates the SCEP CA and RA certificates in the deployed Key Vault, once (Windows counterpart of
# postprovision.sh; same environment variables). Idempotent: when `scep ca show` finds the CA, nothing is created
# (only a missing RA is issued). `scep ca init` issues the RA together with the CA. In static challenge modes
# (SCEP_CHALLENGE_SECRET_NAME set) it creates the challenge secret with a random value when the vault has none
# (`scep challenge init`, never replacing it). With SCEP_GRANT_INTUNE_PERMISSIONS=true it then grants the Intune app
# roles (`scep intune grant`).
# Every Azure call is made as the account azd signed in (SCEP_AZURE_CREDENTIAL=azd), never as whoever `az` is.
$ErrorActionPreference = 'Stop'

if (-not $env:KEY_VAULT_URL) { throw 'KEY_VAULT_URL is not set: it is an output of infra/main.bicep' }
if (-not $env:SCEP_CA_CERT_NAME) { $env:SCEP_CA_CERT_NAME = 'scep-ca' }
if (-not $env:SCEP_RA_CERT_NAME) { $env:SCEP_RA_CERT_NAME = 'scep-ra' }
if (-not $env:SCEP_AZURE_CREDENTIAL) { $env:SCEP_AZURE_CREDENTIAL = 'azd' }

$repoRoot = (Resolve-Path (Join-Path $PSScriptRoot '..\..')).Path

function Find-Scep {
    if ($env:SCEP_CLI) { return $env:SCEP_CLI }
    $onPath = Get-Command scep -ErrorAction SilentlyContinue
    if ($onPath) { return $onPath.Source }
    $venvScep = Join-Path $repoRoot '.venv\Scripts\scep.exe'
    if (Test-Path $venvScep) { return $venvScep }
    Write-Host "Installing the scep command into $repoRoot\.venv"
    python -m venv (Join-Path $repoRoot '.venv')
    & (Join-Path $repoRoot '.venv\Scripts\pip.exe') install --quiet $repoRoot
    if ($LASTEXITCODE -ne 0) { throw 'pip install failed' }
    return $venvScep
}

# Role assignments made by the deployment can take minutes to reach Key Vault: while the vault refuses this
# identity (HTTP 403), wait and ask again. Returns the inventory lines, or $null when there is no CA.
function Read-Inventory {
    $attempts = 20
    foreach ($attempt in 1..$attempts) {
        $output = & $scep ca show 2>&1 | ForEach-Object { "$_" }
        if ($LASTEXITCODE -eq 0) { return $output }
        $text = $output -join "`n"
        if ($text -like '*no CA in*') { return $null }
        if ($text -notlike '*HTTP 403*') { throw "scep ca show failed: $text" }
        Write-Host "Waiting for Key Vault access to propagate ($attempt/$attempts)..."
        Start-Sleep -Seconds 30
    }
    throw "Still no access to $($env:KEY_VAULT_URL): is the deployer's Key Vault Certificates Officer role assigned?"
}

# Static modes only; the value is not printed (`scep challenge init --show` prints it).
function New-Challenge {
    if (-not $env:SCEP_CHALLENGE_SECRET_NAME) { return }
    & $scep challenge init
    if ($LASTEXITCODE -ne 0) { throw 'scep challenge init failed' }
}

function Grant-IntunePermissions {
    if ($env:SCEP_GRANT_INTUNE_PERMISSIONS -ne 'true') { return }
    if (-not $env:INTUNE_AUTH -or $env:INTUNE_AUTH -eq 'managed-identity') {
        & $scep intune grant --principal-id $env:SCEP_IDENTITY_PRINCIPAL_ID
    } else {
        & $scep intune grant --client-id $env:INTUNE_CLIENT_ID
    }
    if ($LASTEXITCODE -ne 0) { throw 'scep intune grant failed' }
}

$scep = Find-Scep

$inventory = Read-Inventory
if ($inventory) {
    $inventory | Write-Host
    if ($inventory | Where-Object { $_ -like '`[ra`]*' }) {
        Write-Host "CA '$($env:SCEP_CA_CERT_NAME)' already exists in $($env:KEY_VAULT_URL): nothing to create."
        New-Challenge
        Grant-IntunePermissions
        exit 0
    }
    Write-Host "The CA exists without an RA: issuing RA certificate '$($env:SCEP_RA_CERT_NAME)'"
    & $scep ca ra issue
    if ($LASTEXITCODE -ne 0) { throw 'scep ca ra issue failed' }
    & $scep ca show
    New-Challenge
    Grant-IntunePermissions
    exit 0
}

$arguments = @()
if ($env:SCEP_CA_SUBJECT) { $arguments += @('--subject', $env:SCEP_CA_SUBJECT) }
if ($env:SCEP_CA_DAYS) { $arguments += @('--days', $env:SCEP_CA_DAYS) }
if ($env:SCEP_CA_KEY_TYPE) { $arguments += @('--key-type', $env:SCEP_CA_KEY_TYPE) }
if ($env:SCEP_CA_KEY_SIZE) { $arguments += @('--key-size', $env:SCEP_CA_KEY_SIZE) }
if ($env:SCEP_CA_CURVE) { $arguments += @('--curve', $env:SCEP_CA_CURVE) }
if (-not $env:KEY_VAULT_SKU -or $env:KEY_VAULT_SKU -eq 'premium') { $arguments += '--hsm' }

Write-Host "Creating CA '$($env:SCEP_CA_CERT_NAME)' and RA '$($env:SCEP_RA_CERT_NAME)' in $($env:KEY_VAULT_URL)"
& $scep ca init @arguments
if ($LASTEXITCODE -ne 0) { throw 'scep ca init failed' }
& $scep ca show
New-Challenge
Grant-IntunePermissions
