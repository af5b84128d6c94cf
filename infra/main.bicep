// defender-correlator: Azure deployment (subscription scope: creates the resource group).
// azd up, or: az deployment sub create -l <region> -f infra/main.bicep -p infra/main.parameters.json
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('Name of the environment (azd environment name); used to derive resource names.')
param environmentName string

@description('Azure region for every resource.')
param location string

@description('Number of partitions of the alerts Event Hub (fixed after creation on Basic/Standard).')
@minValue(1)
@maxValue(32)
param alertsPartitionCount int = 4

@description('Name of an existing Event Hubs namespace to read from (the Defender streaming export target). Empty: create one.')
param existingEventHubNamespace string = ''

@description('Name of the existing hub in that namespace. Used only with existingEventHubNamespace.')
param existingEventHubName string = ''

@description('Webhook URL that receives incident snapshots (HTTPS).')
param webhookUrl string = ''

@secure()
@description('Shared secret used to sign webhook deliveries (stored in Key Vault).')
param webhookSecret string = ''

@description('Webhook body format: json, teams or slack.')
@allowed(['json', 'teams', 'slack'])
param webhookFormat string = 'json'

@description('Comma-separated Entra tenant ids whose Graph alerts_v2 are polled. Empty: the Graph poller is off.')
param graphTenants string = ''

@description('How the Graph poller authenticates: managed_identity (home tenant) or client_secret (multi-tenant app).')
@allowed(['managed_identity', 'client_secret'])
param graphAuth string = 'managed_identity'

@description('Application (client) id of the multi-tenant app registration used with graphAuth=client_secret.')
param graphClientId string = ''

@secure()
@description('Client secret of that app registration (stored in Key Vault).')
param graphClientSecret string = ''

@description('Maximum number of Flex Consumption instances.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Object id of a user or group to grant data access for local development (optional).')
param developerPrincipalId string = ''

var token = toLower(uniqueString(subscription().id, environmentName, location))
var tags = { 'azd-env-name': environmentName, product: 'defender-correlator' }

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: 'rg-${environmentName}'
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: { name: 'id-dc-${token}', location: location, tags: tags }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: { workspaceName: 'log-dc-${token}', appInsightsName: 'appi-dc-${token}', location: location, tags: tags }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: { name: 'stdc${token}', location: location, tags: tags }
}

module eventhubs 'modules/eventhubs.bicep' = {
  name: 'eventhubs'
  scope: rg
  params: {
    namespaceName: empty(existingEventHubNamespace) ? 'evhns-dc-${token}' : existingEventHubNamespace
    hubName: empty(existingEventHubName) ? 'alerts' : existingEventHubName
    useExisting: !empty(existingEventHubNamespace)
    partitionCount: alertsPartitionCount
    consumerGroupName: 'correlator'
    location: location
    tags: tags
  }
}

module keyvault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-dc-${token}'
    location: location
    tags: tags
    webhookSecret: webhookSecret
    graphClientSecret: graphClientSecret
  }
}

module app 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    planName: 'plan-dc-${token}'
    appName: 'func-dc-${token}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: storage.outputs.deploymentContainerName
    appInsightsName: monitoring.outputs.appInsightsName
    eventHubNamespaceFqdn: eventhubs.outputs.fullyQualifiedNamespace
    eventHubName: eventhubs.outputs.hubName
    consumerGroupName: eventhubs.outputs.consumerGroupName
    webhookUrl: webhookUrl
    webhookFormat: webhookFormat
    webhookSecretUri: keyvault.outputs.webhookSecretUri
    graphTenants: graphTenants
    graphAuth: graphAuth
    graphClientId: graphClientId
    graphClientSecretUri: keyvault.outputs.graphClientSecretUri
    maximumInstanceCount: maximumInstanceCount
  }
}

module rbac 'modules/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    principalId: identity.outputs.principalId
    developerPrincipalId: developerPrincipalId
    storageAccountName: storage.outputs.name
    eventHubNamespaceName: eventhubs.outputs.namespaceName
    eventHubName: eventhubs.outputs.hubName
    appInsightsName: monitoring.outputs.appInsightsName
    keyVaultName: keyvault.outputs.name
  }
}

output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = app.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_EVENTHUB_NAMESPACE string = eventhubs.outputs.namespaceName
output AZURE_EVENTHUB_NAME string = eventhubs.outputs.hubName
output AZURE_KEY_VAULT_NAME string = keyvault.outputs.name
output AZURE_APP_INSIGHTS_NAME string = monitoring.outputs.appInsightsName
