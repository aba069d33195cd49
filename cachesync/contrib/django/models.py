"""The outbox table as a Django model: a change and its event commit in one transaction.

The columns are those of :class:`cachesync.Outbox` (table ``cachesync_outbox``), so the
``cachesync_relay`` management command runs the same :class:`cachesync.OutboxRelay` on it.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from ...events import DEFAULT_CHANNEL


class OutboxEvent(models.Model):
    """One change waiting to be published (``sent_at`` is NULL until the broker took it)."""

    id = models.BigAutoField(primary_key=True)
    channel = models.CharField(max_length=255, default=DEFAULT_CHANNEL)
    ns = models.CharField(max_length=256)
    op = models.CharField(max_length=16, default="upsert")
    keys = models.JSONField()
    version = models.BigIntegerField(null=True)
    value = models.JSONField(null=True)
    created_at = models.DateTimeField(default=timezone.now)
    commit_seq = models.BigIntegerField(null=True)
    sent_at = models.DateTimeField(null=True)
    attempts = models.IntegerField(default=0)
    failed_reason = models.TextField(null=True)

    class Meta:
        db_table = "cachesync_outbox"
        indexes = [
            models.Index(
                fields=["channel", "commit_seq", "id"],
                condition=models.Q(sent_at__isnull=True),
                name="ix_cachesync_outbox_pending",
            ),
            models.Index(fields=["sent_at"], name="ix_cachesync_outbox_sent_at"),
        ]

    def __str__(self) -> str:
        return f"{self.op} {self.ns} {self.keys} ({'sent' if self.sent_at else 'pending'})"
