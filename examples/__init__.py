"""Example services: an owner (the source of truth) and a consumer (a cached reader)."""
