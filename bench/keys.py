"""Names and sizes shared by the service's benchmark jobs (`bench.tasks`) and the stock
baseline (`bench.stock_app`), kept apart so that the stock app loads nothing of the service.
"""

#: The Redis list (in the benchmark's broker database) each recovery job appends its start to.
HOLD_STARTS = "bench:hold_starts"
#: How long a recovery job runs: long enough that a SIGKILL finds it running.
HOLD_SECONDS = 1.5
#: The counter each drain job increments.
INCR_COUNTER = "bench:incr"
#: The Redis list each scheduled-lateness job appends (n, due time, start time) to.
DUE_STARTS = "bench:due_starts"
#: The counter each flow-control overhead job increments.
FLOW_COUNTER = "bench:flow"
#: The Redis list each key-limited flow job appends (task id, n, worker, pid, start, end) to.
FLOW_SPANS = "bench:flow_spans"
#: How long each key-limited flow job takes.
FLOW_SERIAL_SECONDS = 0.02
