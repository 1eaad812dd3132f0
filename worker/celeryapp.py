"""This deployment's Celery app, for Celery's own tools: `celery -A gencli.worker.celeryapp flower`
(or `inspect ping`, `events`). It is the app workers and submitters build (worker/app.py), on the
same GENCLI_* settings, so its broker, its key prefix and its queues are theirs."""

from gencli.worker.client import Client

app = Client().app
