"""Prometheus metrics. Labels are closed sets (results, directions, states): never identifiers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per service instance, so tests do not share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhook_updates = Counter(
            "pforte_webhook_updates_total",
            "Webhook updates by result (accepted, duplicate, rejected)",
            ["result"],
            registry=self.registry,
        )
        self.webhook_requests = Counter(
            "pforte_webhook_requests_total",
            "Webhook POSTs by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.messages = Counter(
            "pforte_messages_total",
            "Messages by direction and status reached",
            ["direction", "status"],
            registry=self.registry,
        )
        self.ingest_commit_seconds = Histogram(
            "pforte_ingest_commit_seconds",
            "Duration of one group-commit transaction",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.ingest_group_size = Histogram(
            "pforte_ingest_group_updates",
            "Updates per group commit",
            registry=self.registry,
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 2000, 5000),
        )
        self.outbox_jobs = Counter(
            "pforte_outbox_jobs_total",
            "Outbox jobs finished by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.channels_down = Gauge("pforte_channels_down", "Channels currently DOWN", registry=self.registry)
        self.live_subscribers = Gauge(
            "pforte_live_subscribers", "Open live inbox streams", registry=self.registry
        )
        # The children counted on every webhook POST, looked up once: ``labels()`` takes a lock and
        # checks its values on every call (about 2.5 % of the samples of one status per POST).
        self.updates_accepted = self.webhook_updates.labels("accepted")
        self.updates_duplicate = self.webhook_updates.labels("duplicate")
        self.updates_rejected = self.webhook_updates.labels("rejected")
        self.requests_ok = self.webhook_requests.labels("200")
        self.messages_received = self.messages.labels("in", "received")
