@description('Event Hubs namespace name.')
param namespaceName string

@description('Name of the alerts hub (the Defender streaming export target).')
param hubName string

@description('Partition count of the hub.')
param partitionCount int

@description('Azure region.')
param location string

@description('Resource tags.')
param tags object

// Created only when no existing hub is given; the consumer group and the app's roles on the hub are
// in hubaccess.bicep, which main.bicep deploys in the hub's own resource group either way.
resource namespace 'Microsoft.EventHub/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  sku: { name: 'Standard', tier: 'Standard', capacity: 1 }
  properties: {
    disableLocalAuth: true // no SAS keys: Entra ID roles only
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource hub 'Microsoft.EventHub/namespaces/eventhubs@2024-01-01' = {
  parent: namespace
  name: hubName
  properties: {
    partitionCount: partitionCount
    messageRetentionInDays: 1
  }
}

output namespaceName string = namespace.name
output hubName string = hub.name
