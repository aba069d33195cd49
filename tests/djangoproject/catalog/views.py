import json

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

from .cache import get_currency
from .models import Currency


def currency(request: HttpRequest, code: str) -> HttpResponse:
    if request.method == "POST":
        with transaction.atomic():
            row = Currency.objects.select_for_update().get(code=code)
            row.rate = json.loads(request.body)["rate"]
            row.version += 1
            row.save()  # publishes on commit (publish_changes)
        return JsonResponse({"version": row.version})
    found = get_currency(code)
    if found is None:
        return JsonResponse({"error": "not found"}, status=404)
    return JsonResponse(found)
