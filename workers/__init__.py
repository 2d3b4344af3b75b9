"""Celery workers: the job steps, SSH to servers, the reconciler."""
