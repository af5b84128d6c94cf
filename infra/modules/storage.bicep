@description('Storage account name (3-24 lowercase letters and digits).')
param name string

@description('Azure region.')
param location string

@description('Resource tags.')
param tags object

@description('Replication of the account. LRS and GRS exist in every Flex Consumption region; ZRS/GZRS only where the region has availability zones (infra/flex-facts.json).')
@allowed(['Standard_LRS', 'Standard_GRS', 'Standard_ZRS', 'Standard_GZRS'])
param skuName string

@description('Days a dead-letter or poison claim-check blob (deadletters container) is kept before lifecycle management deletes it.')
@minValue(1)
param deadLetterRetentionDays int = 30

var tables = ['correlatorstate', 'webhookdeliveries', 'graphcursors']
var queues = ['incidents', 'incidents-poison', 'rejected-alerts']
var deploymentContainerName = 'deploymentpackage'
var deadLetterContainerName = 'deadletters' // claim checks of rejected records and poison messages (rejected/..., poison/...)

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:this template has no VNet; Flex Consumption without VNet integration reaches it over public endpoints, access is Entra-ID-only (no keys) - private endpoints are a documented follow-up
  // checkov:skip=CKV_AZURE_59:this template has no VNet; Flex Consumption without VNet integration reaches it over public endpoints, access is Entra-ID-only (no keys) - private endpoints are a documented follow-up
  // checkov:skip=CKV_AZURE_206:skuName is a parameter (storageSku in main.bicep); the LRS default is the one SKU every Flex Consumption region offers, choose ZRS/GRS/GZRS where available - the state is rebuilt from the hub within the window
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: skuName }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false // identity only: no account keys, no connection strings
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: { enabled: true }
        file: { enabled: true }
        queue: { enabled: true, keyType: 'Account' }
        table: { enabled: true, keyType: 'Account' }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: { enabled: true, days: 7 }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: { publicAccess: 'None' }
}

resource deadLetterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deadLetterContainerName
  properties: { publicAccess: 'None' }
}

// Nothing in the app deletes claim checks: lifecycle management does, once they are past any re-drive.
resource deadLetterLifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'expire-dead-letters'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: { blobTypes: ['blockBlob'], prefixMatch: ['${deadLetterContainerName}/'] }
            actions: { baseBlob: { delete: { daysAfterModificationGreaterThan: deadLetterRetentionDays } } }
          }
        }
      ]
    }
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource tableResources 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [for t in tables: {
  parent: tableService
  name: t
}]

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource queueResources 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [for q in queues: {
  parent: queueService
  name: q
}]

output name string = account.name
output deploymentContainerName string = deploymentContainerName
output deadLetterContainerName string = deadLetterContainerName
