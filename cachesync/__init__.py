"""cachesync."""
