// The correlator's consumer group and the app identity's roles on the alerts hub. main.bicep deploys
// this module in the hub's own resource group (and subscription), so an existing Defender export hub
// anywhere in the tenant works, not only one in the new resource group.

@description('Event Hubs namespace name (in this module\'s resource group).')
param namespaceName string

@description('Name of the alerts hub.')
param hubName string

@description('Dedicated consumer group of the correlator.')
param consumerGroupName string

@description('Principal id of the function app identity.')
param principalId string

var roles = {
  eventHubsDataReceiver: 'a638d3c7-ab3a-418d-83e6-5f17a39d4fde' // correlate_alerts trigger
  eventHubsDataSender: '2b629674-e913-4c01-ae53-ef4638d8f975' // poll_graph_alerts publishes to the alerts hub
}

resource namespace 'Microsoft.EventHub/namespaces@2024-01-01' existing = {
  name: namespaceName
}

resource hub 'Microsoft.EventHub/namespaces/eventhubs@2024-01-01' existing = {
  parent: namespace
  name: hubName
}

resource consumerGroup 'Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01' = {
  parent: hub
  name: consumerGroupName
}

resource hubReceiver 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hub.id, principalId, roles.eventHubsDataReceiver)
  scope: hub
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.eventHubsDataReceiver)
  }
}

resource hubSender 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hub.id, principalId, roles.eventHubsDataSender)
  scope: hub
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.eventHubsDataSender)
  }
}

output consumerGroupName string = consumerGroup.name
