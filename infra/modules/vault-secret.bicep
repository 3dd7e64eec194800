// One Key Vault secret, set from a deployment parameter. Called only when a value is given, so a
// redeployment without the value keeps the stored secret.

@description('Name of the existing vault.')
param vaultName string

@description('Secret name.')
param name string

@secure()
@description('Secret value.')
param value string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: vaultName
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  //checkov:skip=CKV_AZURE_41:An expired challenge or credential silently stops enrollment; rotate by setting a new version.
  parent: vault
  name: name
  properties: {
    value: value
    contentType: 'text/plain'
    attributes: {
      enabled: true
    }
  }
}

output name string = secret.name
