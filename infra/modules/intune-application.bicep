// The app registration of INTUNE_AUTH=federated, created when the deployment grants the Intune permissions and
// no intuneClientId was given: it requests the Intune API scep_challenge_provider and Microsoft Graph
// Application.Read.All application permissions, and trusts the function app's user-assigned identity (no secret).
// The app-role grants themselves are made after the deployment by the post-provision hook (`scep intune grant`):
// a Graph grant to a principal created in the same deployment fails at random with "Not a valid reference update"
// until Entra has replicated it (microsoftgraph/msgraph-bicep-types issue 193), and the hook waits that out.
// Deploying this module needs Application.ReadWrite.OwnedBy (or Application Administrator).
extension microsoftGraphV1

@description('Principal (object) id of the function app user-assigned identity.')
param identityPrincipalId string

@description('uniqueName and display name of the app registration.')
param applicationName string

var intuneApiAppId = 'c161e42e-d4df-4a3d-9b42-e7a3c31f59d4'
var microsoftGraphAppId = '00000003-0000-0000-c000-000000000000'
var scepChallengeProviderRoleId = '39d724e8-6a34-4930-9a36-364082c35716'
var applicationReadAllRoleId = '9a5d68dd-52b0-4cc2-bd40-abcf44ac3a30'

resource application 'Microsoft.Graph/applications@v1.0' = {
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
  resource identityCredential 'federatedIdentityCredentials@v1.0' = {
    name: '${applicationName}/scep-function-identity'
    audiences: [
      'api://AzureADTokenExchange'
    ]
    issuer: '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
    subject: identityPrincipalId
    description: 'The SCEP function app user-assigned managed identity'
  }
}

resource applicationPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: application.appId
}

@description('Client id of the app registration the function app authenticates as.')
output clientId string = application.appId
