"""Application log records: JSON or text, carrying the request id of the request being handled."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.log import REQUEST_ID, configure_logging


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    yield stream
    logging.getLogger().handlers.clear()


def test_json_records_carry_the_request_id_of_their_request(stderr: io.StringIO) -> None:
    configure_logging("json", "info", stderr)
    log = logging.getLogger("gateway.test")
    token = REQUEST_ID.set("ab12cd34-7")
    try:
        log.warning("GET /v1/vms -> 503 %s", "state store unavailable")
    finally:
        REQUEST_ID.reset(token)
    log.info("no request here")
    log.debug("below the level")
    first, second = (json.loads(line) for line in stderr.getvalue().splitlines())
    assert first == {
        "ts": first["ts"],
        "type": "log",
        "level": "warning",
        "logger": "gateway.test",
        "msg": "GET /v1/vms -> 503 state store unavailable",
        "request_id": "ab12cd34-7",
    }
    assert "request_id" not in second and second["msg"] == "no request here"


def test_text_records_are_for_people(stderr: io.StringIO) -> None:
    configure_logging("text", "info", stderr)
    token = REQUEST_ID.set("ab12cd34-8")
    try:
        logging.getLogger("gateway.test").error("boom")
    finally:
        REQUEST_ID.reset(token)
    line = stderr.getvalue().strip()
    assert " ERROR gateway.test: boom [rid=ab12cd34-8]" in line
