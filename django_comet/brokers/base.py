from __future__ import annotations


class Broker:
    """Publishes events with ids that grow, and feeds every event, from any process that
    shares the broker, into this process's hub (``django_comet.evloop.hub.hub``) in id
    order."""

    def publish(self, channel: str, data: str, name: str | None = None) -> int:
        """Publish ``data`` (text) on ``channel``; return the event's id."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and threads."""
