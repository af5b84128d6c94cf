@description('Event Hubs namespace name.')
param namespaceName string

@description('Name of the alerts hub (the Defender streaming export target).')
param hubName string

@description('True to use an existing namespace and hub instead of creating them.')
param useExisting bool

@description('Partition count of a created hub.')
param partitionCount int

@description('Dedicated consumer group of the correlator.')
param consumerGroupName string

@description('Azure region.')
param location string

@description('Resource tags.')
param tags object

resource created 'Microsoft.EventHub/namespaces@2024-01-01' = if (!useExisting) {
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

resource createdHub 'Microsoft.EventHub/namespaces/eventhubs@2024-01-01' = if (!useExisting) {
  parent: created
  name: hubName
  properties: {
    partitionCount: partitionCount
    messageRetentionInDays: 1
  }
}

resource existing 'Microsoft.EventHub/namespaces@2024-01-01' existing = if (useExisting) {
  name: namespaceName
}

resource existingHub 'Microsoft.EventHub/namespaces/eventhubs@2024-01-01' existing = if (useExisting) {
  parent: existing
  name: hubName
}

resource consumerGroupOnCreated 'Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01' = if (!useExisting) {
  parent: createdHub
  name: consumerGroupName
}

resource consumerGroupOnExisting 'Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01' = if (useExisting) {
  parent: existingHub
  name: consumerGroupName
}

output namespaceName string = namespaceName
output hubName string = hubName
output consumerGroupName string = consumerGroupName
output fullyQualifiedNamespace string = '${namespaceName}.servicebus.windows.net'
