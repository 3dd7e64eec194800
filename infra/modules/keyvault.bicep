// Key Vault holding the CA and RA certificates (non-exportable keys) and the few secrets the app reads.
// RBAC only (no access policies); soft delete and purge protection keep a deleted CA key recoverable.

@description('Key Vault name (3-24 letters, digits and hyphens, globally unique).')
@minLength(3)
@maxLength(24)
param name string

param location string
param tags object

@description('premium: CA and RA keys in HSMs (FIPS 140 Level 3). standard: software-protected keys.')
@allowed([
  'premium'
  'standard'
])
param skuName string

@description('Principal id of the function app identity (reads certificates, signs and unwraps, reads secrets, renews the RA).')
param identityPrincipalId string

@description('Principal that runs `scep ca init` (CA lifecycle). Empty: no deployer role assignments.')
param deployerPrincipalId string

@description('Also give the deployer Key Vault Secrets Officer: `scep ca import` stores a subordinate CA chain as a secret, `scep challenge init` creates the static challenge.')
param deployerWritesSecrets bool

@description('Log Analytics workspace receiving the vault audit log (every sign and decrypt). Empty: no audit log.')
param auditWorkspaceId string

@description('Name of the secret holding the static SCEP challenge.')
param staticChallengeSecretName string

@secure()
@description('Static SCEP challenge to store. Empty: leave the secret as it is (or absent).')
param staticChallenge string

@description('Name of the secret holding the Intune app registration client secret.')
param intuneClientSecretName string

@secure()
@description('Intune app registration client secret to store. Empty: leave the secret as it is (or absent).')
param intuneClientSecret string

@description('Name of the secret holding the validation-webhook shared secret. Empty: webhooks off.')
param webhookSecretName string

@secure()
@description('Validation-webhook shared secret to store. Empty: leave the secret as it is (or absent).')
param webhookSecret string

var keyVaultCryptoUser = '12338af0-0e69-4776-bea7-57ae8d297424'
var keyVaultCertificateUser = 'db79e9a7-68ee-4b58-9aeb-b90e7c24fcba'
var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'
var keyVaultCertificatesOfficer = 'a4417e6f-fecd-4de8-b567-7b0420556985'
var keyVaultCryptoOfficer = '14b46e9e-c2b7-41b4-b07b-48a6ebf60603'
var keyVaultSecretsOfficer = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

// Flex Consumption without VNet integration reaches the vault over its public endpoint from changing
// addresses (and Key Vault references fail against a network-restricted vault), so RBAC is the control.
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  //checkov:skip=CKV_AZURE_109:Flex Consumption has no fixed outbound IPs to allow-list; access is Entra RBAC only.
  //checkov:skip=CKV_AZURE_189:Flex Consumption without a VNet and Key Vault references both need the public endpoint.
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: skuName
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

// Each secret is written only when its value is given, so a redeployment without it keeps the stored one.
module staticChallengeSecret 'vault-secret.bicep' = if (!empty(staticChallenge)) {
  name: 'secret-static-challenge'
  params: {
    vaultName: vault.name
    name: staticChallengeSecretName
    value: staticChallenge
  }
}

module intuneClientSecretValue 'vault-secret.bicep' = if (!empty(intuneClientSecret)) {
  name: 'secret-intune-client'
  params: {
    vaultName: vault.name
    name: intuneClientSecretName
    value: intuneClientSecret
  }
}

module webhookSecretValue 'vault-secret.bicep' = if (!empty(webhookSecretName) && !empty(webhookSecret)) {
  name: 'secret-webhook'
  params: {
    vaultName: vault.name
    // ARM validates module parameters even when the condition is false, so the name may not be empty.
    name: empty(webhookSecretName) ? 'scep-webhook-secret' : webhookSecretName
    value: webhookSecret
  }
}

// Runtime: sign and unwrapKey with the CA/RA keys, read the certificates, read the secrets.
var identityRoles = [
  keyVaultCryptoUser
  keyVaultCertificateUser
  keyVaultSecretsUser
]

// The daily `maintenance` function renews the RA by itself (scep/core/maintenance.py, scep/core/ca.py issue_ra),
// which writes to the vault; these data actions, and nothing else, are what the built-in readers above lack
// ("Azure permissions for Security", Microsoft.KeyVault data actions):
// - certificates/create/action: begin_create_certificate (the bootstrap and the pending RA version) and
//   merge_certificate ("This operation requires the certificates/create permission");
// - certificates/update/action: tags (scep-role, scep-encryption), disabling the bootstrap version, and deleting
//   a stale pending operation ("requires the certificates/update permission");
// - secrets/setSecret/action: the RA version's encryption-only twin, secret <ra name>-encryption-<version>.
// Certificates are not ARM resources, and the twin's secret name changes with every RA version, so the role is
// assigned at the vault: it also covers the CA certificate and the other secrets (see docs/keyvault.md).
var raRenewalDataActions = [
  'Microsoft.KeyVault/vaults/certificates/create/action'
  'Microsoft.KeyVault/vaults/certificates/update/action'
  'Microsoft.KeyVault/vaults/secrets/setSecret/action'
]

// Custom roles are assignable at management group, subscription or resource group level; this one only here.
resource raRenewalRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, vault.id, 'scep-ra-renewal')
  properties: {
    // Role names are unique per tenant; vault names are globally unique.
    roleName: 'SCEP RA renewal (${name})'
    description: 'Lets the SCEP function app renew its RA in Key Vault ${name}: create and merge certificate versions, tag them, store the RA encryption certificate as a secret. No delete, purge, import, backup or read.'
    type: 'CustomRole'
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: raRenewalDataActions
        notDataActions: []
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}

resource identityRaRenewal 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identityPrincipalId, raRenewalRole.name)
  scope: vault
  properties: {
    // The subscription-level id, the form role assignments take (a definition is stored once per subscription).
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', raRenewalRole.name)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

// Deployer: `scep ca init` / `scep ca ra issue` create certificates (pending CSR, merge) and sign with the new key.
// Writing secrets (the chain above a subordinate CA) is opt-in.
var deployerSecretRoles = deployerWritesSecrets ? [
  keyVaultSecretsOfficer
] : []
var deployerRoles = empty(deployerPrincipalId) ? [] : concat([
  keyVaultCertificatesOfficer
  keyVaultCryptoOfficer
], deployerSecretRoles)

resource identityRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for roleId in identityRoles: {
  name: guid(vault.id, identityPrincipalId, roleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}]

resource deployerRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for roleId in deployerRoles: {
  name: guid(vault.id, deployerPrincipalId, roleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    // No principalType: the deployer may be a user or, in CI, a service principal; a wrong type fails the
    // assignment (UnmatchedPrincipalType), and without it ARM looks the principal up itself.
    principalId: deployerPrincipalId
  }
}]

resource auditLog 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = if (!empty(auditWorkspaceId)) {
  name: 'audit'
  scope: vault
  properties: {
    workspaceId: auditWorkspaceId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
  }
}

output name string = vault.name
output uri string = vault.properties.vaultUri
output id string = vault.id
