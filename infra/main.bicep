// defender-correlator: Azure deployment (subscription scope: creates the resource group).
// azd up, or: az deployment sub create -l <region> -f infra/main.bicep -p infra/main.parameters.json
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('Name of the environment (azd environment name); used to derive resource names.')
param environmentName string

@description('Azure region for every resource: one that offers Flex Consumption (infra/flex-facts.json, from Microsoft\'s Flex template; `az functionapp list-flexconsumption-locations` lists the current ones).')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({ azd: { type: 'location' } })
param location string

@description('Python version of the Flex Consumption runtime (3.10-3.13 are supported by Flex; CI tests 3.10, 3.11 and 3.13).')
@allowed(['3.10', '3.11', '3.12', '3.13'])
param pythonVersion string = '3.11'

@description('Replication of the storage account. Standard_LRS exists in every Flex region; ZRS/GZRS only in regions with availability zones.')
@allowed(['Standard_LRS', 'Standard_GRS', 'Standard_ZRS', 'Standard_GZRS'])
param storageSku string = 'Standard_LRS'

@description('Days dead-letter and poison claim-check blobs are kept (lifecycle management deletes them after).')
@minValue(1)
param deadLetterRetentionDays int = 30

@description('Number of partitions of the alerts Event Hub (fixed after creation on Basic/Standard).')
@minValue(1)
@maxValue(32)
param alertsPartitionCount int = 4

@description('Name of an existing Event Hubs namespace to read from (the Defender streaming export target). Empty: create one.')
param existingEventHubNamespace string = ''

@description('Name of the existing hub in that namespace (default alerts). Used only with existingEventHubNamespace.')
param existingEventHubName string = ''

@description('Resource group of the existing namespace. Empty: the new resource group (rg-<environmentName>).')
param existingEventHubResourceGroup string = ''

@description('Subscription id of the existing namespace. Empty: this deployment\'s subscription.')
param existingEventHubSubscriptionId string = ''

@description('Key Vault purge protection (recommended; then `azd down` leaves the vault name taken for 90 days, see README). false: `azd down --purge` frees the name at once (test environments).')
param keyVaultPurgeProtection bool = true

@description('Key Vault name override (3-24 characters). Empty: kv-dc-<token>. Set a new one to redeploy an environment whose old vault is still soft-deleted.')
param keyVaultName string = ''

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
var resourceGroupName = 'rg-${environmentName}'
var useExistingHub = !empty(existingEventHubNamespace)
var hubNamespaceName = useExistingHub ? existingEventHubNamespace : 'evhns-dc-${token}'
var hubName = useExistingHub && !empty(existingEventHubName) ? existingEventHubName : 'alerts'
var hubResourceGroup = useExistingHub && !empty(existingEventHubResourceGroup) ? existingEventHubResourceGroup : resourceGroupName
var hubSubscriptionId = useExistingHub && !empty(existingEventHubSubscriptionId) ? existingEventHubSubscriptionId : subscription().subscriptionId
var consumerGroupName = 'correlator'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: resourceGroupName
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
  params: {
    name: 'stdc${token}'
    location: location
    tags: tags
    skuName: storageSku
    deadLetterRetentionDays: deadLetterRetentionDays
  }
}

module eventhubs 'modules/eventhubs.bicep' = if (!useExistingHub) {
  name: 'eventhubs'
  scope: rg
  params: {
    namespaceName: hubNamespaceName
    hubName: hubName
    partitionCount: alertsPartitionCount
    location: location
    tags: tags
  }
}

// Consumer group + Receiver/Sender roles where the hub lives: the new resource group, or the existing
// hub's own resource group and subscription.
module hubAccess 'modules/hubaccess.bicep' = {
  name: 'hubaccess-${token}'
  scope: resourceGroup(hubSubscriptionId, hubResourceGroup)
  params: {
    namespaceName: hubNamespaceName
    hubName: hubName
    consumerGroupName: consumerGroupName
    principalId: identity.outputs.principalId
  }
  dependsOn: [rg, eventhubs]
}

module keyvault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: empty(keyVaultName) ? 'kv-dc-${token}' : keyVaultName
    location: location
    tags: tags
    purgeProtection: keyVaultPurgeProtection
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
    eventHubNamespaceFqdn: '${hubNamespaceName}.servicebus.windows.net'
    eventHubName: hubName
    consumerGroupName: hubAccess.outputs.consumerGroupName
    webhookUrl: webhookUrl
    webhookFormat: webhookFormat
    webhookSecretUri: keyvault.outputs.webhookSecretUri
    webhookSecretConfigured: !empty(webhookSecret)
    graphTenants: graphTenants
    graphAuth: graphAuth
    graphClientId: graphClientId
    graphClientSecretUri: keyvault.outputs.graphClientSecretUri
    graphClientSecretConfigured: graphAuth == 'client_secret' && !empty(graphClientSecret)
    pythonVersion: pythonVersion
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
    appInsightsName: monitoring.outputs.appInsightsName
    keyVaultName: keyvault.outputs.name
  }
}

output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = app.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_EVENTHUB_NAMESPACE string = hubNamespaceName
output AZURE_EVENTHUB_NAME string = hubName
output AZURE_KEY_VAULT_NAME string = keyvault.outputs.name
output AZURE_APP_INSIGHTS_NAME string = monitoring.outputs.appInsightsName
