"""The outbox table (the columns of cachesync.Outbox) and, on PostgreSQL, its triggers: the
commit stamp (the order the relay publishes in) and the NOTIFY that wakes the relay."""

from typing import Any

import django.utils.timezone
from django.db import migrations, models


def _notify_trigger(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return  # the relay polls
    from cachesync import Outbox

    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        (schema,) = cursor.fetchone()
        for statement in Outbox.postgresql_sql(schema):
            cursor.execute(statement)


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="OutboxEvent",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("channel", models.CharField(default="cachesync", max_length=255)),
                ("ns", models.CharField(max_length=256)),
                ("op", models.CharField(default="upsert", max_length=16)),
                ("keys", models.JSONField()),
                ("version", models.BigIntegerField(null=True)),
                ("value", models.JSONField(null=True)),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                ("commit_seq", models.BigIntegerField(null=True)),
                ("sent_at", models.DateTimeField(null=True)),
                ("attempts", models.IntegerField(default=0)),
                ("failed_reason", models.TextField(null=True)),
            ],
            options={
                "db_table": "cachesync_outbox",
                "indexes": [
                    models.Index(
                        condition=models.Q(sent_at__isnull=True),
                        fields=["channel", "commit_seq", "id"],
                        name="ix_cachesync_outbox_pending",
                    ),
                    models.Index(fields=["sent_at"], name="ix_cachesync_outbox_sent_at"),
                ],
            },
        ),
        migrations.RunPython(_notify_trigger, migrations.RunPython.noop),
    ]
