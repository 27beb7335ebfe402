"""Bad input to `jobs-service` is one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.cli import main
from tests.integration.conftest import Services, run_cli

#: Inputs found wrong before, each with what its one line says.
BAD_INPUTS = {
    ("enqueue", "jobs.process_order", "[1]", "--queue", "bogus"): "unknown queue 'bogus'",
    ("enqueue", "jobs.process_item", "[1]", "--count", "0"): "'--count': 0 is not in the range",
    ("enqueue", "jobs.process_item", "[1]", "--count", "-3"): "'--count'",
    ("enqueue", "jobs.process_order", "[99999999999999999999999]"): "argument 'order_id'",
    ("enqueue", "jobs.send_email", '[1, "nope"]'): "argument 'email_type'",
    ("dead-letters", "list", "--limit", "-1"): "'--limit'",
    ("dead-letters", "show", "99999999999999999999"): "'ENTRY_ID'",
    ("dead-letters", "show", "7"): "dead letter 7 not found",
    ("dead-letters",): "name a command: list, show, retry, discard",
    ("import", "/nonexistent.csv"): "'CSV_PATH'",
    ("import", "/tmp"): "is a directory",
    ("import", "/dev/null", "--timeout", "nan"): "a number of seconds",
    ("health", "--timeout", "-1"): "a number of seconds",
    ("enqueue",): "Missing argument 'JOB_NAME'",
    ("bogus",): "No such command 'bogus'",
}


@pytest.mark.parametrize("args", list(BAD_INPUTS), ids=" ".join)
def test_each_known_bad_input_is_one_line_and_exit_status_2(
    services: Services, args: tuple[str, ...]
) -> None:
    result = run_cli(services, *args)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert BAD_INPUTS[args] in result.stderr


def test_an_unreachable_database_or_broker_is_one_line(services: Services) -> None:
    database = run_cli(
        services, "dead-letters", "list", DATABASE_URL="postgresql://x@127.0.0.1:9/x"
    )
    broker = run_cli(services, "queues", broker="redis://127.0.0.1:9/0")

    for result, says in ((database, "database error"), (broker, "cannot reach the broker")):
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith(says) and len(result.stderr.splitlines()) == 1


#: Words the fuzz builds command lines from: commands, job names, JSON, option values.
#: (`health` and a waiting `import` are left out: they wait for a worker by design.)
COMMANDS = st.sampled_from(
    [
        ["enqueue"],
        ["queues"],
        ["queues", "pause"],
        ["queues", "resume"],
        ["schedule"],
        ["dead-letters", "list"],
        ["dead-letters", "show"],
        ["dead-letters", "retry"],
        ["dead-letters", "discard"],
        ["import", "--no-wait"],
    ]
)
WORDS = st.sampled_from(
    [
        "jobs.process_order",
        "jobs.send_email",
        "jobs.update_inventory",
        "jobs.daily_report",
        "jobs.nope",
        "[1]",
        "[0]",
        "[-1]",
        '[1, "nope"]',
        '[1, "order_confirmation"]',
        '["2026-13-45"]',
        "[1, 2, 3]",
        "[]",
        "{}",
        "[1e400]",
        "[true]",
        "[null]",
        "[",
        '{"a": 1}',
        "--kwargs",
        "--queue",
        "--count",
        "--limit",
        "--json",
        "--all",
        "--job",
        "--timeout",
        "low",
        "bogus",
        "0",
        "-1",
        "1",
        "2",
        "nan",
        "inf",
        "1e99",
        "99999999999999999999",
        "/tmp",
        "/nonexistent.csv",
        "",
        "é",
    ]
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(command=COMMANDS, words=st.lists(WORDS, max_size=4))
def test_fuzzed_command_lines_end_in_success_or_one_line_and_exit_status_2(
    services: Services, command: list[str], words: list[str]
) -> None:
    result = CliRunner().invoke(main, [*command, *words])

    # An exception other than SystemExit is what would have printed a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        command,
        words,
        result.exception,
    )
    assert result.exit_code in (0, 2), (command, words, result.stderr)
    if result.exit_code == 2:
        assert len(result.stderr.splitlines()) == 1, (command, words, result.stderr)
