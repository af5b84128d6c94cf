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

@description('Webhook URL (empty: forward_incident fails fast naming WEBHOOK_URL).')
param webhookUrl string

@description('Webhook body format.')
param webhookFormat string

@description('Key Vault secret URI of the webhook secret.')
param webhookSecretUri string

@description('Tenants polled through Graph (empty: poller off).')
param graphTenants string

@description('Graph authentication mode.')
param graphAuth string

@description('Client id of the Graph app registration (client_secret mode).')
param graphClientId string

@description('Key Vault secret URI of the Graph client secret.')
param graphClientSecretUri string

@description('Maximum number of instances.')
param maximumInstanceCount int

var blobUri = 'https://${storageAccountName}.blob.${environment().suffixes.storage}'
var queueUri = 'https://${storageAccountName}.queue.${environment().suffixes.storage}'
var tableUri = 'https://${storageAccountName}.table.${environment().suffixes.storage}'

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
      runtime: { name: 'python', version: '3.11' }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [
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
        { name: 'WEBHOOK_SECRET', value: '@Microsoft.KeyVault(SecretUri=${webhookSecretUri})' }
        { name: 'WEBHOOK_FORMAT', value: webhookFormat }
        { name: 'WEBHOOK_ACTIONS', value: 'created,updated' }
        { name: 'WEBHOOK_MIN_SEVERITY', value: '1' }
        { name: 'WEBHOOK_MAX_DEQUEUE_COUNT', value: '5' }
        { name: 'DELIVERY_TABLE', value: 'webhookdeliveries' }
        { name: 'INCIDENTS_POISON_QUEUE', value: 'incidents-poison' }
        // Graph alerts_v2 poller
        { name: 'GRAPH_TENANTS', value: graphTenants }
        { name: 'GRAPH_AUTH', value: graphAuth }
        { name: 'GRAPH_CLIENT_ID', value: graphClientId }
        { name: 'GRAPH_CLIENT_SECRET', value: graphAuth == 'client_secret' ? '@Microsoft.KeyVault(SecretUri=${graphClientSecretUri})' : '' }
        { name: 'GRAPH_POLL_SCHEDULE', value: '0 */5 * * * *' }
        { name: 'GRAPH_CURSOR_TABLE', value: 'graphcursors' }
      ]
    }
  }
}

output name string = site.name
