@description('Key Vault name.')
param name string

@description('Azure region.')
param location string

@description('Resource tags.')
param tags object

@description('Purge protection (recommended for production). Once on, it cannot be turned off, and after `azd down` the soft-deleted vault keeps its name for 90 days (README: redeploying).')
param purgeProtection bool

@secure()
@description('Webhook signing secret; stored as secret webhook-secret when given.')
param webhookSecret string

@secure()
@description('Graph client secret; stored as secret graph-client-secret when given.')
param graphClientSecret string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109:this template has no VNet; Flex Consumption without VNet integration reaches it over public endpoints, access is Entra-ID-only (no keys) - private endpoints are a documented follow-up
  // checkov:skip=CKV_AZURE_189:this template has no VNet; Flex Consumption without VNet integration reaches it over public endpoints, access is Entra-ID-only (no keys) - private endpoints are a documented follow-up
  // checkov:skip=CKV_AZURE_110:purge protection is the parameter keyVaultPurgeProtection (default true), which checkov cannot resolve; false only for test environments redeployed after `azd down --purge`
  // checkov:skip=CKV_AZURE_42:soft delete is always on (90 days); purge protection is the parameter keyVaultPurgeProtection (default true), which checkov cannot resolve
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    // ARM refuses an explicit false here: off means leaving the property out (null).
    enablePurgeProtection: purgeProtection ? true : null
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource webhook 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(webhookSecret)) {
  // checkov:skip=CKV_AZURE_41:an expiry would silently stop signed delivery; the operator rotates the secret (README operations)
  // checkov:skip=CKV_AZURE_114:contentType is set below; checkov does not read properties of conditional (if) resources
  parent: vault
  name: 'webhook-secret'
  properties: {
    value: webhookSecret
    contentType: 'text/plain'
  }
}

resource graph 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(graphClientSecret)) {
  // checkov:skip=CKV_AZURE_41:the app registration's secret carries its own expiry in Entra ID; duplicating it here would drift
  // checkov:skip=CKV_AZURE_114:contentType is set below; checkov does not read properties of conditional (if) resources
  parent: vault
  name: 'graph-client-secret'
  properties: {
    value: graphClientSecret
    contentType: 'text/plain'
  }
}

output name string = vault.name
// Secret URIs (not values): app settings reference them as @Microsoft.KeyVault(SecretUri=...).
output webhookSecretUri string = '${vault.properties.vaultUri}secrets/webhook-secret'
output graphClientSecretUri string = '${vault.properties.vaultUri}secrets/graph-client-secret'
