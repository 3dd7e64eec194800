// Flex Consumption plan and the Python function app that serves SCEP. The app authenticates to storage,
// Key Vault, Application Insights and Intune as its user-assigned identity; no keys or connection secrets.

param name string
param planName string
param location string
param tags object

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity (AZURE_CLIENT_ID, AzureWebJobsStorage__clientId).')
param identityClientId string

param blobEndpoint string
param tableEndpoint string

@description('URL of the blob container the platform deploys the package from.')
param deploymentContainerUrl string

param applicationInsightsConnectionString string

@description('Key Vault URI, with the trailing slash Key Vault returns.')
param keyVaultUri string

@allowed([
  '3.10'
  '3.11'
  '3.12'
])
param pythonVersion string

@minValue(1)
@maxValue(1000)
param maximumInstanceCount int

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int

@description('Instances kept warm for HTTP (0 = scale to zero; each warm instance is billed while idle).')
@minValue(0)
param alwaysReadyInstances int

@description('Spread instances across availability zones (the region must offer zones for Flex Consumption). The platform then keeps at least two always-ready instances, billed as always-ready ("Reliability in Azure Functions"); the plan below says so explicitly.')
param zoneRedundant bool

@description('Redirect plain HTTP to HTTPS. false lets devices and routers that cannot speak HTTPS enrol over HTTP.')
param httpsOnly bool

@description('Concurrent HTTP requests per instance; also the Python thread pool size (functions are synchronous).')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int

param caCertName string
param raCertName string
param ocspCertName string
@description('Base of the revocation URLs in certificates; empty: the app\'s default https:// host name.')
param publicBaseUrl string
param tablePrefix string
param challengeMode string
param certValidityDays int
@description('Key Vault secret holding the static challenge; empty when the mode has no static challenge.')
param staticChallengeSecretName string
param intuneTenantId string
param intuneClientId string
param intuneAuth string
param intuneClientSecretName string

@description('Client id of the admin API app registration: the audience of admin access tokens.')
param adminClientId string
param webhookSecretName string

// A zone-redundant Flex Consumption app always keeps two always-ready instances; ask for them, so that what is
// billed is what the template says.
var alwaysReadyHttpInstances = zoneRedundant ? max(2, alwaysReadyInstances) : alwaysReadyInstances

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  //checkov:skip=CKV_AZURE_225:Zone redundancy is the zoneRedundant parameter (off by default: not every Flex region has zones).
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
    zoneRedundant: zoneRedundant
  }
}

// Devices cannot present function keys or Entra tokens: SCEP's own signed messages and the challenge are the
// authentication, so the endpoints are anonymous and App Service authentication stays off.
resource site 'Microsoft.Web/sites@2024-04-01' = {
  //checkov:skip=CKV_AZURE_222:Devices enrol over the internet, so the SCEP endpoint must be publicly reachable.
  //checkov:skip=CKV_AZURE_17:Devices enrol before they hold a certificate; SCEP messages are signed and challenge-checked.
  //checkov:skip=CKV_AZURE_212:Flex Consumption scales out on demand; warm instances are the alwaysReadyInstances parameter.
  //checkov:skip=CKV_AZURE_213:Instance health is managed by the Flex Consumption platform; App Service health check is not used.
  //checkov:skip=CKV_AZURE_78:ARM rejects siteConfig FTPS state on Flex Consumption; FTP is off by the ftp basicPublishingCredentialsPolicies.
  //checkov:skip=CKV_AZURE_14:HTTPS-only is the httpsOnly parameter, true by default; false only for routers that cannot speak HTTPS.
  //checkov:skip=CKV_AZURE_153:Same httpsOnly parameter as CKV_AZURE_14 (this template deploys no slots).
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: httpsOnly
    publicNetworkAccess: 'Enabled'
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      // No FTPS state here: ARM rejects that site property on Flex Consumption ("Flex Consumption plan
      // deprecations", app settings reference); FTP stays off through basicPublishingCredentialsPolicies below.
      http20Enabled: true
      // Every setting the app reads in Azure. FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION and
      // WEBSITE_RUN_FROM_PACKAGE are not set: Flex Consumption takes them from functionAppConfig and rejects them.
      appSettings: [
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identityClientId
        }
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: blobEndpoint
        }
        {
          name: 'AzureWebJobsStorage__tableServiceUri'
          value: tableEndpoint
        }
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: applicationInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'ClientId=${identityClientId};Authorization=AAD'
        }
        {
          name: 'AZURE_CLIENT_ID'
          value: identityClientId
        }
        {
          name: 'PYTHON_THREADPOOL_THREAD_COUNT'
          value: string(httpPerInstanceConcurrency)
        }
        {
          name: 'KEY_VAULT_URL'
          value: keyVaultUri
        }
        {
          name: 'SCEP_CA_CERT_NAME'
          value: caCertName
        }
        {
          name: 'SCEP_RA_CERT_NAME'
          value: raCertName
        }
        {
          name: 'SCEP_OCSP_CERT_NAME'
          value: ocspCertName
        }
        {
          // https: with httpsOnly App Service answers plain HTTP with a redirect (docs/revocation.md). The site's own
          // defaultHostName cannot be read inside its own definition; without a custom domain it is <name>.azurewebsites.net.
          name: 'SCEP_PUBLIC_BASE_URL'
          value: empty(publicBaseUrl) ? 'https://${name}.azurewebsites.net' : publicBaseUrl
        }
        {
          name: 'SCEP_STORE'
          value: 'tables'
        }
        {
          name: 'SCEP_TABLES_ENDPOINT'
          value: tableEndpoint
        }
        {
          name: 'SCEP_TABLE_PREFIX'
          value: tablePrefix
        }
        {
          name: 'SCEP_CHALLENGE_MODE'
          value: challengeMode
        }
        {
          // Read by name at run time, never as a Key Vault reference: an unresolved reference would leave its own
          // predictable text as the value.
          name: 'SCEP_CHALLENGE_SECRET_NAME'
          value: staticChallengeSecretName
        }
        {
          name: 'SCEP_CERT_VALIDITY_DAYS'
          value: string(certValidityDays)
        }
        {
          name: 'SCEP_WEBHOOK_SECRET_NAME'
          value: webhookSecretName
        }
        {
          name: 'INTUNE_TENANT_ID'
          value: intuneTenantId
        }
        {
          name: 'SCEP_ADMIN_AUTH'
          value: 'entra'
        }
        {
          name: 'SCEP_ADMIN_TENANT_ID'
          value: tenant().tenantId
        }
        {
          name: 'SCEP_ADMIN_AUDIENCE'
          value: adminClientId
        }
        {
          name: 'INTUNE_CLIENT_ID'
          value: intuneClientId
        }
        {
          name: 'INTUNE_AUTH'
          value: intuneAuth
        }
        {
          name: 'INTUNE_CLIENT_SECRET_NAME'
          value: intuneAuth == 'secret' ? intuneClientSecretName : ''
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: (alwaysReadyHttpInstances > 0) ? [
          {
            name: 'http'
            instanceCount: alwaysReadyHttpInstances
          }
        ] : []
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}


// Deployments authenticate with Entra (azd, az CLI, Core Tools); publishing user names and passwords are off.
resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

output name string = site.name
output defaultHostName string = site.properties.defaultHostName
