// SCEP certification authority for Microsoft Intune on Azure Functions (Flex Consumption).
// Deploys into an existing resource group: `az deployment group create` or `azd up`.
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(64)
@description('Name of the environment (azd environment name); seeds the unique resource names and the azd-env-name tag.')
param environmentName string

@description('Region of every resource; must offer Flex Consumption.')
param location string = resourceGroup().location

@description('Name of the function app; the SCEP URL becomes https://<name>.azurewebsites.net/api/scep. Empty: generated.')
param functionAppName string = ''

@description('premium: CA/RA keys in HSMs. standard: software keys (half the per-operation price, twice the throughput).')
@allowed([
  'premium'
  'standard'
])
param keyVaultSku string = 'premium'

@description('Storage replication for host state and the certificate inventory.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSku string = 'Standard_LRS'

@description('Python version of the Functions runtime.')
@allowed([
  '3.10'
  '3.11'
  '3.12'
])
param pythonVersion string = '3.12'

@description('Upper bound of Flex Consumption instances (cost ceiling and Key Vault throughput guard).')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Memory of each instance.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Spread the function app across availability zones (needs a region with zones for Flex Consumption). Costs money while idle: a zone-redundant Flex Consumption app always keeps at least two always-ready HTTP instances, billed as always-ready, so alwaysReadyInstances is raised to 2.')
param zoneRedundant bool = false

@description('HTTP instances kept warm, billed while idle (0: scale to zero, first request after idle waits for a cold start; at least 2 with zoneRedundant).')
@minValue(0)
@maxValue(20)
param alwaysReadyInstances int = 0

@description('Concurrent HTTP requests per instance (enrollment is I/O bound: Key Vault and Intune calls).')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 16

@description('Days Log Analytics keeps telemetry and the Key Vault audit log.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Send the Key Vault audit log (every key operation) to Log Analytics.')
param vaultAuditLog bool = true

@description('Email address that receives the alerts (CA/RA expiring, Intune failing, Key Vault throttling, HTTP 5xx). Empty: no action group; the alerts still fire and show in the portal.')
param alertEmail string = ''

@description('SCEP_TABLE_PREFIX: inventory tables are <prefix>Transactions and <prefix>Certificates. Letters and digits, starting with a letter.')
@minLength(1)
@maxLength(40)
param scepTablePrefix string = 'scep'

@description('SCEP_CA_CERT_NAME: Key Vault certificate holding the CA.')
param scepCaCertName string = 'scep-ca'

@description('SCEP_RA_CERT_NAME: Key Vault certificate holding the RA (decrypts requests, signs replies).')
param scepRaCertName string = 'scep-ra'

@description('SCEP_OCSP_CERT_NAME: Key Vault certificate holding the delegated OCSP signer (`scep ca ocsp issue`).')
param scepOcspCertName string = 'scep-ocsp'

@description('SCEP_PUBLIC_BASE_URL: base of the CRL, CA certificate and OCSP URLs in issued certificates. Empty: https://<function app name>.azurewebsites.net (a custom domain: its https:// URL).')
param publicBaseUrl string = ''

@description('SCEP_CHALLENGE_MODE: who may enrol. intune: Intune validates each challenge. static: one shared challenge (from Key Vault). static,intune: either.')
@allowed([
  'intune'
  'static'
  'static,intune'
])
param scepChallengeMode string = 'intune'

@description('SCEP_CERT_VALIDITY_DAYS: validity of issued certificates.')
@minValue(1)
@maxValue(3650)
param scepCertValidityDays int = 365

@description('SCEP_CHALLENGE_SECRET_NAME: Key Vault secret holding the static challenge; the app reads it by name at run time.')
param staticChallengeSecretName string = 'scep-challenge'

@secure()
@description('Static challenge to store in Key Vault (modes with static); a redeployment with a new value replaces it. Empty: the stored challenge is kept; the post-provision hook (`scep challenge init`) creates a random one when the vault has none.')
param staticChallenge string = ''

@description('INTUNE_TENANT_ID: tenant whose Intune validates challenges.')
param intuneTenantId string = tenant().tenantId

@description('INTUNE_AUTH. managed-identity: the function identity holds the Intune roles itself. federated: an app registration trusts the identity (no secret). secret: an app registration with a client secret in Key Vault.')
@allowed([
  'managed-identity'
  'federated'
  'secret'
])
param intuneAuth string = 'managed-identity'

@description('INTUNE_CLIENT_ID: client id of an existing app registration (federated or secret). Empty in federated mode with grantIntunePermissions: the deployment creates the app registration.')
param intuneClientId string = ''

@description('INTUNE_CLIENT_SECRET_NAME: Key Vault secret holding the app registration client secret (secret mode).')
param intuneClientSecretName string = 'intune-client-secret'

@secure()
@description('Client secret to store in Key Vault (secret mode). Empty: keep the stored secret.')
param intuneClientSecret string = ''

@description('Have the Intune API scep_challenge_provider and Graph Application.Read.All roles granted: the federated app registration is created here, and the post-provision hook grants the roles (`scep intune grant`, needs Privileged Role Administrator). false: the INTUNE_PERMISSION_COMMANDS output lists what an administrator runs.')
param grantIntunePermissions bool = false

@description('Name (uniqueName and display name) of the app registration created in federated mode. Empty: generated.')
param intuneApplicationName string = ''

@description('SCEP_ADMIN_AUDIENCE: client id of an existing admin API app registration (with the app role SCEP.Admin). Empty: the deployment creates one (needs Application.ReadWrite.OwnedBy).')
param adminClientId string = ''

@description('SCEP_WEBHOOK_SECRET_NAME: Key Vault secret with the shared secret of step-ca style validation webhooks. Empty: webhooks off.')
param webhookSecretName string = ''

@secure()
@description('Webhook shared secret to store under webhookSecretName. Empty: keep the stored secret.')
param webhookSecret string = ''

@description('Object id of who runs `scep ca init` (azd sets it to its signed-in user or service principal). Empty: no deployer roles on the vault.')
param deployerPrincipalId string = ''

@description('Also give the deployer Key Vault Secrets Officer (needed by `scep ca import` for a subordinate CA, and to set secrets). Static challenge modes grant it anyway: the post-provision hook creates the challenge and the deployer reads it to configure devices.')
param deployerWritesSecrets bool = false

@description('Refuse plain HTTP (redirect to HTTPS). false only for devices or routers that cannot speak HTTPS to SCEP: SCEP messages are signed and encrypted, but the challenge and the CA download then cross the network in the clear.')
param httpsOnly bool = true

var resourceToken = toLower(uniqueString(resourceGroup().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  application: 'scep-intune-ca'
}
var appName = !empty(functionAppName) ? functionAppName : 'func-scep-${resourceToken}'
var applicationName = !empty(intuneApplicationName) ? intuneApplicationName : 'scep-intune-${resourceToken}'
var deploymentContainerName = 'deployment-package'
var staticChallengeEnabled = contains(split(scepChallengeMode, ','), 'static')
var createApplication = grantIntunePermissions && intuneAuth == 'federated' && empty(intuneClientId)

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-scep-${resourceToken}'
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    logAnalyticsName: 'log-scep-${resourceToken}'
    applicationInsightsName: 'appi-scep-${resourceToken}'
    location: location
    tags: tags
    retentionInDays: logRetentionDays
    identityPrincipalId: identity.properties.principalId
  }
}

module observability 'modules/observability.bicep' = {
  name: 'observability'
  params: {
    applicationInsightsId: monitoring.outputs.applicationInsightsId
    resourceToken: resourceToken
    location: location
    tags: tags
    alertEmail: alertEmail
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    name: 'stscep${resourceToken}'
    location: location
    tags: tags
    skuName: storageSku
    deploymentContainerName: deploymentContainerName
    tablePrefix: scepTablePrefix
    identityPrincipalId: identity.properties.principalId
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: 'kv-scep-${resourceToken}'
    location: location
    tags: tags
    skuName: keyVaultSku
    identityPrincipalId: identity.properties.principalId
    deployerPrincipalId: deployerPrincipalId
    deployerWritesSecrets: deployerWritesSecrets || staticChallengeEnabled
    auditWorkspaceId: vaultAuditLog ? monitoring.outputs.workspaceId : ''
    staticChallengeSecretName: staticChallengeSecretName
    // Only a challenge the deployer gives is written: a generated value would change on every deployment and
    // break every configured device. The post-provision hook creates a missing one once (`scep challenge init`).
    staticChallenge: staticChallengeEnabled ? staticChallenge : ''
    intuneClientSecretName: intuneClientSecretName
    intuneClientSecret: intuneClientSecret
    webhookSecretName: webhookSecretName
    webhookSecret: webhookSecret
  }
}

module intuneApplication 'modules/intune-application.bicep' = if (createApplication) {
  name: 'intune-application'
  params: {
    identityPrincipalId: identity.properties.principalId
    applicationName: applicationName
  }
}

module adminApplication 'modules/admin-application.bicep' = if (empty(adminClientId)) {
  name: 'admin-application'
  params: {
    applicationName: 'scep-admin-${resourceToken}'
  }
}

var effectiveAdminClientId = empty(adminClientId) ? adminApplication.outputs.clientId : adminClientId

// The app registration created here (federated mode) wins over the parameter; otherwise the parameter is used.
var effectiveIntuneClientId = intuneAuth == 'managed-identity' ? '' : (createApplication ? intuneApplication.outputs.clientId : intuneClientId)

module functionApp 'modules/function-app.bicep' = {
  name: 'function-app'
  params: {
    name: appName
    planName: 'plan-scep-${resourceToken}'
    location: location
    tags: union(tags, {
      'azd-service-name': 'api'
    })
    identityId: identity.id
    identityClientId: identity.properties.clientId
    blobEndpoint: storage.outputs.blobEndpoint
    tableEndpoint: storage.outputs.tableEndpoint
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    applicationInsightsConnectionString: monitoring.outputs.connectionString
    keyVaultUri: keyVault.outputs.uri
    pythonVersion: pythonVersion
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    zoneRedundant: zoneRedundant
    alwaysReadyInstances: alwaysReadyInstances
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    caCertName: scepCaCertName
    raCertName: scepRaCertName
    ocspCertName: scepOcspCertName
    publicBaseUrl: publicBaseUrl
    tablePrefix: scepTablePrefix
    challengeMode: scepChallengeMode
    certValidityDays: scepCertValidityDays
    staticChallengeSecretName: staticChallengeEnabled ? staticChallengeSecretName : ''
    httpsOnly: httpsOnly
    intuneTenantId: intuneTenantId
    intuneClientId: effectiveIntuneClientId
    intuneAuth: intuneAuth
    intuneClientSecretName: intuneClientSecretName
    webhookSecretName: webhookSecretName
    adminClientId: effectiveAdminClientId
  }
}

// What an administrator runs (bash, az CLI signed in as Privileged Role Administrator) when the deployment
// does not grant the Intune permissions itself. Shell variables are set by the earlier lines.
var lookupIntuneApi = 'INTUNE_API=$(az ad sp show --id c161e42e-d4df-4a3d-9b42-e7a3c31f59d4 --query id -o tsv)'
var lookupMicrosoftGraph = 'MS_GRAPH=$(az ad sp show --id 00000003-0000-0000-c000-000000000000 --query id -o tsv)'
var grantScepChallengeProvider = '''az rest --method POST --uri "https://graph.microsoft.com/v1.0/servicePrincipals/$GRANTEE/appRoleAssignments" --body "{\"principalId\":\"$GRANTEE\",\"resourceId\":\"$INTUNE_API\",\"appRoleId\":\"39d724e8-6a34-4930-9a36-364082c35716\"}"'''
var grantApplicationReadAll = '''az rest --method POST --uri "https://graph.microsoft.com/v1.0/servicePrincipals/$GRANTEE/appRoleAssignments" --body "{\"principalId\":\"$GRANTEE\",\"resourceId\":\"$MS_GRAPH\",\"appRoleId\":\"9a5d68dd-52b0-4cc2-bd40-abcf44ac3a30\"}"'''
var federatedCredentialTemplate = '''az ad app federated-credential create --id $APP_ID --parameters "{\"name\":\"scep-function-identity\",\"issuer\":\"ISSUER\",\"subject\":\"SUBJECT\",\"audiences\":[\"api://AzureADTokenExchange\"]}"'''
var federatedCredentialCommand = replace(replace(federatedCredentialTemplate, 'ISSUER', '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'), 'SUBJECT', identity.properties.principalId)
var createApplicationCommands = [
  'APP_ID=$(az ad app create --display-name ${applicationName} --sign-in-audience AzureADMyOrg --query appId -o tsv)'
  'az ad sp create --id $APP_ID'
  federatedCredentialCommand
]
var applicationCommands = intuneAuth == 'federated' && empty(intuneClientId) ? createApplicationCommands : [
  'APP_ID=${intuneClientId}'
]
var granteeCommands = intuneAuth == 'managed-identity' ? [
  'GRANTEE=${identity.properties.principalId}'
] : concat(applicationCommands, [
  'GRANTEE=$(az ad sp show --id $APP_ID --query id -o tsv)'
])
var redeployCommands = intuneAuth == 'federated' && empty(intuneClientId) ? [
  'echo "Deploy again with intuneClientId=$APP_ID"'
] : []
var permissionCommands = concat(granteeCommands, [
  lookupIntuneApi
  lookupMicrosoftGraph
  grantScepChallengeProvider
  grantApplicationReadAll
], redeployCommands)

var appBaseUrl = 'https://${functionApp.outputs.defaultHostName}/api'

@description('SCEP server URL for the Intune SCEP certificate profile.')
output SCEP_SERVER_URL string = '${appBaseUrl}/scep'

@description('CA certificate (PEM) for the Intune trusted certificate profile; also /api/ca.der and /api/ca.crt.')
output SCEP_CA_DOWNLOAD_URL string = '${appBaseUrl}/ca.pem'

output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output SERVICE_API_NAME string = functionApp.outputs.name
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output AZURE_LOCATION string = location

@description('Vault URI; `scep ca init` reads it from KEY_VAULT_URL.')
output KEY_VAULT_URL string = keyVault.outputs.uri
output KEY_VAULT_NAME string = keyVault.outputs.name
output KEY_VAULT_SKU string = keyVaultSku
output SCEP_CA_CERT_NAME string = scepCaCertName
output SCEP_RA_CERT_NAME string = scepRaCertName
output SCEP_OCSP_CERT_NAME string = scepOcspCertName
output SCEP_CHALLENGE_MODE string = scepChallengeMode

@description('Client id of the function app user-assigned identity (AZURE_CLIENT_ID of the app).')
output SCEP_IDENTITY_CLIENT_ID string = identity.properties.clientId

@description('Principal (object) id of the function app user-assigned identity.')
output SCEP_IDENTITY_PRINCIPAL_ID string = identity.properties.principalId

output INTUNE_TENANT_ID string = intuneTenantId
output INTUNE_AUTH string = intuneAuth
output INTUNE_CLIENT_ID string = effectiveIntuneClientId

@description('true: the post-provision hook grants the Intune app roles (scep intune grant) to the identity or the app registration.')
output SCEP_GRANT_INTUNE_PERMISSIONS bool = grantIntunePermissions

@description('Key Vault secret holding the static challenge (empty in intune-only mode).')
output SCEP_CHALLENGE_SECRET_NAME string = staticChallengeEnabled ? staticChallengeSecretName : ''

@description('Commands an administrator runs to grant the Intune permissions; empty when the deployment granted them.')
output INTUNE_PERMISSION_COMMANDS array = grantIntunePermissions ? [] : permissionCommands
