"""Azure Functions entry point (Python v2 model): bindings only; the logic lives in ``shared``."""

from __future__ import annotations

import typing

import azure.functions as func

from shared.functions import get_forwarder, get_graph_runtime, get_runtime

app = func.FunctionApp()


@app.function_name("correlate_alerts")
@app.retry(strategy="exponential_backoff", max_retry_count="-1", minimum_interval="00:00:05", maximum_interval="00:05:00")
@app.event_hub_message_trigger(
    arg_name="events",
    connection="ALERTS_EVENTHUB",
    event_hub_name="%ALERTS_EVENTHUB_NAME%",
    consumer_group="%ALERTS_CONSUMER_GROUP%",
    cardinality=func.Cardinality.MANY,
    data_type="binary",
)
@app.queue_output(arg_name="incidents", queue_name="%INCIDENTS_QUEUE%", connection="AzureWebJobsStorage")
def correlate_alerts(events: typing.List[func.EventHubEvent], incidents: func.Out[typing.List[str]]) -> None:  # noqa: UP006
    """Correlate a batch of Defender alerts; incident snapshots go to the incidents queue."""
    outcome = get_runtime().handler.handle(events)
    if outcome.incidents:
        incidents.set(outcome.incidents)


@app.function_name("purge_expired_state")
@app.timer_trigger(arg_name="timer", schedule="%PURGE_SCHEDULE%", run_on_startup=False, use_monitor=True)
def purge_expired_state(timer: func.TimerRequest) -> None:
    """Delete window state whose window and incident lifetime have both passed."""
    get_runtime().purge()


@app.function_name("fire_due_absences")
@app.timer_trigger(arg_name="timer", schedule="0 * * * * *", run_on_startup=False, use_monitor=True)
def fire_due_absences(timer: func.TimerRequest) -> None:
    """Every minute: fire NOT FOLLOWED_BY absences and quiet-period clears whose time has passed.
    No output binding: the snapshots are queued before their state is saved (see Runtime.fire_due)."""
    get_runtime().fire_due()


@app.function_name("forward_incident")
@app.queue_trigger(arg_name="message", queue_name="%INCIDENTS_QUEUE%", connection="AzureWebJobsStorage")
def forward_incident(message: func.QueueMessage) -> None:
    """POST an incident snapshot, signed, to the configured webhook(s); idempotent per revision."""
    get_forwarder().handle(message.get_body(), dequeue_count=message.dequeue_count or 1, message_id=message.id)


@app.function_name("poll_graph_alerts")
@app.timer_trigger(arg_name="timer", schedule="%GRAPH_POLL_SCHEDULE%", run_on_startup=False, use_monitor=True)
def poll_graph_alerts(timer: func.TimerRequest) -> None:
    """Poll Graph alerts_v2 and incidents (GRAPH_RESOURCES) for each tenant in GRAPH_TENANTS; publish to the alerts hub."""
    graph = get_graph_runtime()
    if graph is not None:  # off unless GRAPH_TENANTS is configured
        graph.run()
