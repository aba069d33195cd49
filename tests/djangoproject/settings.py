"""A small Django project for the tests: the catalog app owns currencies and also reads them
through a cached function (owner and consumer in one process, over the real broker)."""

import os

SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["testserver"]
ROOT_URLCONF = "tests.djangoproject.urls"
INSTALLED_APPS = ["cachesync.contrib.django", "tests.djangoproject.catalog"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("CACHESYNC_TEST_PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("CACHESYNC_TEST_PGPORT", "5432"),
        "USER": os.environ.get("CACHESYNC_TEST_PGUSER", "postgres"),
        "NAME": "test",
        # The test database is created (with the migrations) and dropped by the tests.
        "TEST": {"NAME": f"cachesync_django_{os.getpid()}"},
    }
}
CACHESYNC = {
    "URL": os.environ.get("CACHESYNC_TEST_URL", "redis://127.0.0.1:6379/0"),
    "CHANNEL": os.environ.get("CACHESYNC_TEST_CHANNEL", "cachesync"),
    "CLIENT": "tests.djangoproject.catalog.cache:sync",
    "CONNECT_TIMEOUT": 5.0,
    "HEARTBEAT_INTERVAL": 0.5,
}
