// Parameters for main.bicep. azd fills the environment variables it owns (AZURE_ENV_NAME, AZURE_LOCATION,
// AZURE_PRINCIPAL_ID; the region is the resource group's); with `az deployment group create`, export them first or override with --parameters.
// Every other value can be set the same way: `azd env set SCEP_CHALLENGE_MODE static,intune`.
using 'main.bicep'

param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'scep')
param keyVaultSku = readEnvironmentVariable('SCEP_KEY_VAULT_SKU', 'premium')
param scepTablePrefix = readEnvironmentVariable('SCEP_TABLE_PREFIX', 'scep')
param scepChallengeMode = readEnvironmentVariable('SCEP_CHALLENGE_MODE', 'intune')
param scepCertValidityDays = int(readEnvironmentVariable('SCEP_CERT_VALIDITY_DAYS', '365'))
param intuneAuth = readEnvironmentVariable('INTUNE_AUTH', 'managed-identity')
param intuneClientId = readEnvironmentVariable('INTUNE_CLIENT_ID', '')
param grantIntunePermissions = bool(readEnvironmentVariable('SCEP_GRANT_INTUNE_PERMISSIONS', 'false'))
param webhookSecretName = readEnvironmentVariable('SCEP_WEBHOOK_SECRET_NAME', '')
param deployerPrincipalId = readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')
param deployerWritesSecrets = bool(readEnvironmentVariable('SCEP_DEPLOYER_WRITES_SECRETS', 'false'))
param alwaysReadyInstances = int(readEnvironmentVariable('SCEP_ALWAYS_READY_INSTANCES', '0'))
param maximumInstanceCount = int(readEnvironmentVariable('SCEP_MAXIMUM_INSTANCE_COUNT', '100'))
param staticChallenge = readEnvironmentVariable('SCEP_STATIC_CHALLENGE', '')
param httpsOnly = bool(readEnvironmentVariable('SCEP_HTTPS_ONLY', 'true'))
param alertEmail = readEnvironmentVariable('SCEP_ALERT_EMAIL', '')
