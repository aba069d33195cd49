from django.urls import path

from .catalog import views

urlpatterns = [path("currencies/<str:code>", views.currency)]
