"""The extension's logger makes no record that its handlers would drop (jupyter_server logs every
proxied request through it at debug level), and still passes on every record they take."""

import logging

from lightllm_nb.server_ext.app import make_no_records_that_no_handler_takes


class _Kept(logging.Handler):
    def __init__(self, level):
        super().__init__(level)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def _logger(name, *handler_levels, propagate=False):
    log = logging.getLogger(f"test_server_ext_logging.{name}")
    log.handlers = [_Kept(level) for level in handler_levels]
    log.propagate = propagate
    log.setLevel(logging.DEBUG)  # as traitlets leaves an application's logger
    return log


def test_records_below_every_handlers_level_are_not_made():
    log = _logger("info", logging.INFO, logging.WARNING)
    made = []
    log.makeRecord = lambda *args, **kwargs: made.append(args) or logging.Logger.makeRecord(log, *args, **kwargs)
    make_no_records_that_no_handler_takes(log)
    log.debug("GET /lightllm/api/generate 200")
    assert made == []
    log.info("kept")
    log.warning("kept too")
    assert [h.records for h in log.handlers] == [["kept", "kept too"], ["kept too"]]


def test_a_logger_whose_records_go_further_is_left_alone():
    debug_everywhere = _logger("debug", logging.DEBUG)
    propagating = _logger("propagating", logging.WARNING, propagate=True)  # a parent's handler may want debug
    for log in (debug_everywhere, propagating):
        make_no_records_that_no_handler_takes(log)
        assert log.level == logging.DEBUG
