"""One module per job phase; Celery tasks in workers/tasks.py only call into these."""
