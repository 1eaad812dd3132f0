"""The queue side of gencli (Celery workers, submit client); built by the queue issue."""
