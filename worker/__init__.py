"""The queue: the submit client and the token stream (worker/client.py, worker/stream.py), the
Celery app, and the worker process that claims, decodes and streams jobs.

The client and the stream protocol stay here beside the worker, not in a folder of their own:
they are the two ends of one protocol (the event schema, the Redis keys, the Celery message) and
change together with the worker; the edges that use them (cli/, api/) import them from here.
"""
