"""Progress lines from Ray Train workers are shown once (logged when logging is configured)."""

import logging

import pytest

from jin_orchestrate._worker_log import quiet_report_dumps, say


@pytest.fixture
def bare_root():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    yield root
    root.handlers, root.level = saved[0], saved[1]


def test_without_logging_configured_the_line_is_printed(bare_root, capsys):
    bare_root.handlers = []  # pytest may add its capture handlers after fixtures are set up
    say("[jin] stage step 1/2")
    assert capsys.readouterr().out == "[jin] stage step 1/2\n"


def test_with_a_root_handler_the_line_is_logged_once_and_not_printed(bare_root, capsys):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    bare_root.handlers = [Keep()]
    bare_root.setLevel(logging.INFO)
    say("[jin] stage step 2/2")
    assert [r.getMessage() for r in records] == ["[jin] stage step 2/2"]
    assert capsys.readouterr().out == ""
    # A root logger that drops INFO must not swallow the line.
    bare_root.setLevel(logging.WARNING)
    say("[jin] stage resumes after step 1")
    assert capsys.readouterr().out == "[jin] stage resumes after step 1\n"


def test_ray_trains_report_dumps_are_kept_to_warnings():
    from ray.train.v2._internal.execution import context

    reports = logging.getLogger(context.__file__)
    saved = reports.level
    try:
        reports.setLevel(logging.NOTSET)
        quiet_report_dumps()
        assert not reports.isEnabledFor(logging.INFO)
        assert reports.isEnabledFor(logging.WARNING)
    finally:
        reports.setLevel(saved)
