"""The jobs: one module per job, each a Celery task registered as `jobs.<snake_case>`."""
