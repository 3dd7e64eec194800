// Entra permissions Intune requires of a third-party SCEP CA: the Intune API app role scep_challenge_provider
// and Microsoft Graph Application.Read.All, granted as application permissions (app role assignments).
// Deploying this module needs a deployer allowed to grant app roles (Privileged Role Administrator, or
// AppRoleAssignment.ReadWrite.All + Application.ReadWrite.OwnedBy/All for the app registration mode).
extension microsoftGraphV1

@description('managed-identity: grant to the user-assigned identity. federated: create an app registration trusting that identity and grant to it. secret: grant to the existing app registration clientId.')
@allowed([
  'managed-identity'
  'federated'
  'secret'
])
param mode string

@description('Principal (object) id of the function app user-assigned identity.')
param identityPrincipalId string

@description('uniqueName and display name of the app registration created in federated mode.')
param applicationName string

@description('Client id of an existing app registration (secret mode).')
param existingClientId string

var intuneApiAppId = 'c161e42e-d4df-4a3d-9b42-e7a3c31f59d4'
var microsoftGraphAppId = '00000003-0000-0000-c000-000000000000'
var scepChallengeProviderRoleId = '39d724e8-6a34-4930-9a36-364082c35716'
var applicationReadAllRoleId = '9a5d68dd-52b0-4cc2-bd40-abcf44ac3a30'

resource intuneApi 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: intuneApiAppId
}

resource microsoftGraph 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: microsoftGraphAppId
}

resource application 'Microsoft.Graph/applications@v1.0' = if (mode == 'federated') {
  uniqueName: applicationName
  displayName: applicationName
  signInAudience: 'AzureADMyOrg'
  requiredResourceAccess: [
    {
      resourceAppId: intuneApiAppId
      resourceAccess: [
        {
          id: scepChallengeProviderRoleId
          type: 'Role'
        }
      ]
    }
    {
      resourceAppId: microsoftGraphAppId
      resourceAccess: [
        {
          id: applicationReadAllRoleId
          type: 'Role'
        }
      ]
    }
  ]

  // The function app's identity is the only credential: no client secret or certificate exists.
  resource identityCredential 'federatedIdentityCredentials@v1.0' = if (mode == 'federated') {
    name: '${applicationName}/scep-function-identity'
    audiences: [
      'api://AzureADTokenExchange'
    ]
    issuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
    subject: identityPrincipalId
    description: 'The SCEP function app user-assigned managed identity'
  }
}

resource applicationPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = if (mode == 'federated') {
  appId: application.appId
}

resource existingApplicationPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' existing = if (mode == 'secret') {
  appId: existingClientId
}

var granteePrincipalId = mode == 'managed-identity' ? identityPrincipalId : (mode == 'federated' ? applicationPrincipal.id : existingApplicationPrincipal.id)

resource scepChallengeProvider 'Microsoft.Graph/appRoleAssignedTo@v1.0' = {
  appRoleId: scepChallengeProviderRoleId
  principalId: granteePrincipalId
  resourceId: intuneApi.id
}

resource applicationReadAll 'Microsoft.Graph/appRoleAssignedTo@v1.0' = {
  appRoleId: applicationReadAllRoleId
  principalId: granteePrincipalId
  resourceId: microsoftGraph.id
}

@description('Client id of the app registration the app authenticates as (empty in managed-identity mode).')
output clientId string = mode == 'federated' ? application.appId : (mode == 'secret' ? existingClientId : '')

output granteePrincipalId string = granteePrincipalId
