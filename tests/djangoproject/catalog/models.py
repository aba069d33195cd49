from django.db import models

from cachesync.contrib.django import publish_changes


@publish_changes(
    "currencies",
    key="code",
    version="version",
    value=lambda c: {"code": c.code, "rate": c.rate, "version": c.version},
)
class Currency(models.Model):
    code = models.CharField(max_length=3, unique=True)
    rate = models.FloatField()
    version = models.IntegerField(default=1)

    class Meta:
        app_label = "catalog"
