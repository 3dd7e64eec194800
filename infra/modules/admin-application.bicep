// The app registration of the admin API (SCEP_ADMIN_AUDIENCE): operators get its app role SCEP.Admin, and the
// function app accepts only access tokens issued for it that carry that role (scep/http/admin_auth.py).
// requestedAccessTokenVersion 2: tokens carry the v2.0 issuer and aud = this application's client id
// ("Access tokens in the Microsoft identity platform"). The user_impersonation scope, pre-authorised for the Azure
// CLI, lets an operator sign in with `az account get-access-token --resource <client id>` without a consent prompt.
// Deploying this module needs Application.ReadWrite.OwnedBy (or Application Administrator).
extension microsoftGraphV1

@description('uniqueName and display name of the app registration.')
param applicationName string

var azureCliAppId = '04b07795-8ddb-461a-bbee-02f9e1bf7b46'
var adminRoleId = guid(subscription().id, applicationName, 'SCEP.Admin')
var scopeId = guid(subscription().id, applicationName, 'user_impersonation')

resource application 'Microsoft.Graph/applications@v1.0' = {
  uniqueName: applicationName
  displayName: applicationName
  signInAudience: 'AzureADMyOrg'
  appRoles: [
    {
      id: adminRoleId
      value: 'SCEP.Admin'
      displayName: 'SCEP administrator'
      description: 'List issued certificates and revoke them through the SCEP admin API'
      allowedMemberTypes: [
        'User'
        'Application'
      ]
      isEnabled: true
    }
  ]
  api: {
    requestedAccessTokenVersion: 2
    oauth2PermissionScopes: [
      {
        id: scopeId
        value: 'user_impersonation'
        type: 'Admin'
        adminConsentDisplayName: 'Use the SCEP admin API'
        adminConsentDescription: 'Call the SCEP admin API as the signed-in operator (the app role still decides)'
        isEnabled: true
      }
    ]
    preAuthorizedApplications: [
      {
        appId: azureCliAppId
        delegatedPermissionIds: [
          scopeId
        ]
      }
    ]
  }
}

// appRoleAssignmentRequired: only users and applications given SCEP.Admin can obtain a token at all.
resource applicationPrincipal 'Microsoft.Graph/servicePrincipals@v1.0' = {
  appId: application.appId
  appRoleAssignmentRequired: true
}

@description('Client id of the admin API app registration (the audience of its access tokens).')
output clientId string = application.appId

@description('Id of the SCEP.Admin app role, to assign to operators.')
output adminRoleId string = adminRoleId
