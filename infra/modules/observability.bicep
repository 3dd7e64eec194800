// What operators watch: an Azure Monitor workbook over the app's Application Insights data, and log alert rules
// (scheduled queries) for what needs a person: a CA or RA near its end, Intune validation failing, Key Vault
// throttling, server errors. Metrics are the app's OpenTelemetry metrics (azure-monitor-opentelemetry), which land
// in the customMetrics table under their instrument names; HTTP 5xx come from the requests table. Counters are
// summed (valueSum), histograms averaged as sum(valueSum) / sum(valueCount), gauges read as their minimum.

@description('Resource id of the Application Insights component (workbook source, scope of every alert).')
param applicationInsightsId string

@description('Seeds the names of the workbook, the alerts and the action group.')
param resourceToken string

param location string
param tags object

@description('Email address that receives every alert. Empty: no action group; the alerts still fire and show in the portal.')
param alertEmail string

@description('Days before the CA or RA expires at which the expiry alert fires.')
@minValue(1)
@maxValue(365)
param expiryAlertDays int = 30

var workbookName = 'SCEP CA (${resourceToken})'

// The workbook's content lives in infra/workbook.json; the deployment adds the component it opens on.
resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, applicationInsightsId, 'scep-workbook')
  location: location
  // The portal lists a workbook under its hidden-title tag.
  tags: union(tags, {
    'hidden-title': workbookName
  })
  kind: 'shared'
  properties: {
    displayName: workbookName
    category: 'workbook'
    sourceId: applicationInsightsId
    serializedData: string(union(loadJsonContent('../workbook.json'), {
      fallbackResourceIds: [
        applicationInsightsId
      ]
    }))
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-scep-${resourceToken}'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'scep-ca'
    enabled: true
    emailReceivers: [
      {
        name: 'operators'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var alertActions = {
  actionGroups: empty(alertEmail) ? [] : [
    actionGroup.id
  ]
}

// Each alert: a KQL query over the component, a measure column, a threshold, how often and over what window.
var alerts = [
  {
    key: 'expiry'
    displayName: 'SCEP CA or RA expires within ${expiryAlertDays} days'
    description: 'The CA or the RA certificate has at most ${expiryAlertDays} days left (scep.ca.days_to_expiry, scep.ra.days_to_expiry). RA: it renews itself; if this persists, run `scep ca ra renew`. CA: roll it over (docs/operations.md, Alerts).'
    severity: 2
    query: 'customMetrics\n| where name in ("scep.ca.days_to_expiry", "scep.ra.days_to_expiry")\n| extend Certificate = iff(name == "scep.ca.days_to_expiry", "CA", "RA")\n| summarize DaysLeft = min(valueMin) by Certificate'
    measure: 'DaysLeft'
    aggregation: 'Minimum'
    operator: 'LessThanOrEqual'
    threshold: expiryAlertDays
    dimension: 'Certificate'
    frequency: 'PT1H'
    window: 'P1D'
  }
  {
    key: 'intune'
    displayName: 'SCEP Intune calls failing'
    description: 'Calls to Intune (validateRequest, successNotification, failureNotification) failed (scep.intune.failures, split by code): devices that enrol with an Intune challenge are refused or their certificates withheld.'
    severity: 1
    query: 'customMetrics\n| where name == "scep.intune.failures"\n| extend Code = tostring(customDimensions["code"])\n| summarize Failures = sum(valueSum) by Code'
    measure: 'Failures'
    aggregation: 'Total'
    operator: 'GreaterThan'
    threshold: 0
    dimension: 'Code'
    frequency: 'PT5M'
    window: 'PT15M'
  }
  {
    key: 'throttling'
    displayName: 'SCEP Key Vault throttling'
    description: 'Key Vault answered 429 to key operations (scep.keyvault.throttled): enrollments slow down and, past the time budget, fail.'
    severity: 2
    query: 'customMetrics\n| where name == "scep.keyvault.throttled"\n| summarize Throttled = sum(valueSum)'
    measure: 'Throttled'
    aggregation: 'Total'
    operator: 'GreaterThan'
    threshold: 0
    dimension: ''
    frequency: 'PT5M'
    window: 'PT15M'
  }
  {
    key: 'server-errors'
    displayName: 'SCEP server errors (HTTP 5xx)'
    description: 'A request ended with HTTP 5xx (requests table): custody or the store failed, or a bug. The app answers a bad SCEP message with 4xx or a signed FAILURE, never 5xx.'
    severity: 1
    query: 'requests\n| where toint(resultCode) between (500 .. 599)\n| summarize Errors = count() by ResultCode = resultCode'
    measure: 'Errors'
    aggregation: 'Total'
    operator: 'GreaterThan'
    threshold: 0
    dimension: 'ResultCode'
    frequency: 'PT5M'
    window: 'PT5M'
  }
]

resource alertRules 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = [for alert in alerts: {
  name: 'scep-${alert.key}-${resourceToken}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: alert.displayName
    description: alert.description
    severity: alert.severity
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: alert.frequency
    windowSize: alert.window
    criteria: {
      allOf: [
        {
          query: alert.query
          timeAggregation: alert.aggregation
          metricMeasureColumn: alert.measure
          operator: alert.operator
          threshold: alert.threshold
          dimensions: empty(alert.dimension) ? [] : [
            {
              name: alert.dimension
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
}]
