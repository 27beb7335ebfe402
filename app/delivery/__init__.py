"""How a message travels between Redis and a job.

- `transport`: kombu's Redis transport with an atomic fetch, a tag per delivery, in-flight
  records naming their worker, envelope checks, poison limits, pausing and queue aliases.
- `scripts`: the Lua steps every record change goes through.
- `heartbeat`: each worker process's heartbeat, and the recovery of dead workers' messages.
- `envelope`: what a message must be before kombu and Celery see it.
- `rejected`: messages taken out of circulation, on their way to the dead-letter store.
- `records`: the Redis key names, and what operators read and change (workers, pausing).
- `requests`: Celery's request class, telling the transport which requeues follow a death.
- `bulk`: many jobs published to Redis in few round trips (`perform_all_later`).

The job layer (`app.jobs`) holds the job semantics and uses this package to publish.
"""
