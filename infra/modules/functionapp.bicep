@description('Name of the Flex Consumption plan.')
param planName string

@description('Name of the function app.')
param appName string

@description('Azure region.')
param location string

@description('Resource tags.')
param tags object

@description('Resource id of the user-assigned managed identity.')
param identityId string

@description('Client id of that identity (identity-based connections and AZURE_CLIENT_ID).')
param identityClientId string

@description('Storage account for host storage, window state, queues and the deployment package.')
param storageAccountName string

@description('Blob container that holds the deployment package.')
param deploymentContainerName string

@description('Name of the Application Insights component (its connection string is read here, never output).')
param appInsightsName string

@description('Event Hubs namespace host name, e.g. ns.servicebus.windows.net.')
param eventHubNamespaceFqdn string

@description('Name of the alerts hub.')
param eventHubName string

@description('Consumer group of the correlator.')
param consumerGroupName string

@description('Webhook URL (empty: forwarding is off; forward_incident consumes incidents without sending them).')
param webhookUrl string

@description('Webhook body format.')
param webhookFormat string

@description('Key Vault secret URI of the webhook secret.')
param webhookSecretUri string

@description('True when the webhook secret was given (and stored in Key Vault); false: no WEBHOOK_SECRET setting at all.')
param webhookSecretConfigured bool

@description('Tenants polled through Graph (empty: poller off).')
param graphTenants string

@description('Graph authentication mode.')
param graphAuth string

@description('Client id of the Graph app registration (client_secret mode).')
param graphClientId string

@description('Key Vault secret URI of the Graph client secret.')
param graphClientSecretUri string

@description('True when the Graph client secret was given (and stored in Key Vault); false: no GRAPH_CLIENT_SECRET setting.')
param graphClientSecretConfigured bool

@description('Python version of the Flex Consumption runtime (infra/flex-facts.json lists what Flex supports).')
param pythonVersion string

@description('Maximum number of instances.')
param maximumInstanceCount int

var blobUri = 'https://${storageAccountName}.blob.${environment().suffixes.storage}'
var queueUri = 'https://${storageAccountName}.queue.${environment().suffixes.storage}'
var tableUri = 'https://${storageAccountName}.table.${environment().suffixes.storage}'

// Secret references only for secrets that exist: a reference to a missing Key Vault secret would
// reach the code as its own text and fail every invocation (each incident would end in poison).
var webhookSecretSettings = webhookSecretConfigured ? [
  { name: 'WEBHOOK_SECRET', value: '@Microsoft.KeyVault(SecretUri=${webhookSecretUri})' }
] : []
var graphSecretSettings = graphClientSecretConfigured ? [
  { name: 'GRAPH_CLIENT_SECRET', value: '@Microsoft.KeyVault(SecretUri=${graphClientSecretUri})' }
] : []

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Flex Consumption (FC1) has no plan-level zone redundancy setting; instances are managed by the platform
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:deployment (azd/one deploy) needs the site's endpoint; the app has no HTTP functions, only Event Hub, queue and timer triggers
  // checkov:skip=CKV_AZURE_17:no HTTP functions: client certificates have nothing to protect
  // checkov:skip=CKV_AZURE_212:Flex Consumption scales to zero by design; Event Hub checkpoints make any instance resume the work
  // checkov:skip=CKV_AZURE_213:no HTTP endpoint to probe; health is the batch_summary telemetry (README operations)
  // checkov:skip=CKV_AZURE_78:ARM rejects siteConfig.ftpsState on Flex Consumption (error 51021, infra/flex-facts.json); Flex deploys only from the blob container in functionAppConfig.deployment
  // checkov:skip=CKV_AZURE_67:http20Enabled is not among the siteConfig properties known to be accepted on Flex Consumption (infra/flex-facts.json); the app has no HTTP functions
  // checkov:skip=CKV_AZURE_18:http20Enabled is not among the siteConfig properties known to be accepted on Flex Consumption (infra/flex-facts.json); the app has no HTTP functions
  name: appName
  location: location
  tags: union(tags, { 'azd-service-name': 'api' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    keyVaultReferenceIdentity: identityId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${blobUri}/${deploymentContainerName}'
          authentication: { type: 'UserAssignedIdentity', userAssignedIdentityResourceId: identityId }
        }
      }
      scaleAndConcurrency: { maximumInstanceCount: maximumInstanceCount, instanceMemoryMB: 2048 }
      runtime: { name: 'python', version: pythonVersion }
    }
    // siteConfig holds only what Flex Consumption accepts (infra/flex-facts.json, checked by
    // tests/test_infra.py): ARM rejects ftpsState and others there (error 51021).
    siteConfig: {
      minTlsVersion: '1.2'
      appSettings: concat([
        // Host storage, identity-based (no keys)
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__clientId', value: identityClientId }
        { name: 'AzureWebJobsStorage__blobServiceUri', value: blobUri }
        { name: 'AzureWebJobsStorage__queueServiceUri', value: queueUri }
        { name: 'AzureWebJobsStorage__tableServiceUri', value: tableUri }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: appInsights.properties.ConnectionString }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'ClientId=${identityClientId};Authorization=AAD' }
        { name: 'AZURE_CLIENT_ID', value: identityClientId }
        // Alerts Event Hub (trigger, and the Graph poller's publisher), identity-based
        { name: 'ALERTS_EVENTHUB__fullyQualifiedNamespace', value: eventHubNamespaceFqdn }
        { name: 'ALERTS_EVENTHUB__credential', value: 'managedidentity' }
        { name: 'ALERTS_EVENTHUB__clientId', value: identityClientId }
        { name: 'ALERTS_EVENTHUB_NAME', value: eventHubName }
        { name: 'ALERTS_CONSUMER_GROUP', value: consumerGroupName }
        // Correlator state and queues
        { name: 'STATE_STORAGE__tableServiceUri', value: tableUri }
        { name: 'STATE_STORAGE__queueServiceUri', value: queueUri }
        { name: 'STATE_STORAGE__blobServiceUri', value: blobUri }
        { name: 'DEADLETTER_CONTAINER', value: 'deadletters' }
        { name: 'EVENT_TIME_MAX_SKEW_SECONDS', value: '300' }
        { name: 'EVENT_TIME_MAX_AGE_SECONDS', value: '315360000' }
        { name: 'STATE_TABLE', value: 'correlatorstate' }
        { name: 'INCIDENTS_QUEUE', value: 'incidents' }
        { name: 'REJECTED_QUEUE', value: 'rejected-alerts' }
        { name: 'PURGE_SCHEDULE', value: '0 */15 * * * *' }
        // Webhook delivery
        { name: 'WEBHOOK_URL', value: webhookUrl }
        { name: 'WEBHOOK_FORMAT', value: webhookFormat }
        { name: 'WEBHOOK_ACTIONS', value: 'created,updated' }
        { name: 'WEBHOOK_MIN_SEVERITY', value: '1' }
        { name: 'WEBHOOK_MAX_DEQUEUE_COUNT', value: '5' }
        { name: 'DELIVERY_TABLE', value: 'webhookdeliveries' }
        { name: 'INCIDENTS_POISON_QUEUE', value: 'incidents-poison' }
        // Graph poller (alerts_v2 and incidents)
        { name: 'GRAPH_TENANTS', value: graphTenants }
        { name: 'GRAPH_RESOURCES', value: 'alerts_v2,incidents' }
        { name: 'GRAPH_AUTH', value: graphAuth }
        { name: 'GRAPH_CLIENT_ID', value: graphClientId }
        { name: 'GRAPH_POLL_SCHEDULE', value: '0 */5 * * * *' }
        { name: 'GRAPH_CURSOR_TABLE', value: 'graphcursors' }
      ], webhookSecretSettings, graphSecretSettings)
    }
  }
}

output name string = site.name
