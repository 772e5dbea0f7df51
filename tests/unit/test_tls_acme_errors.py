"""How ACME error answers become IssueErrors: the Retry-After they came with, and rate limits."""

from __future__ import annotations

import json

import josepy as jose
import pytest
import requests
from acme import messages
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.tls.acme import RATE_LIMITED_RETRY_S, _issue_error, _RetryAfterNetwork


def error_answer(status: int, typ: str, retry_after: str | None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers["Content-Type"] = "application/problem+json"
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    problem = {"type": f"urn:ietf:params:acme:error:{typ}", "detail": "slow down"}
    response._content = json.dumps(problem).encode()
    return response


def network() -> _RetryAfterNetwork:
    return _RetryAfterNetwork(jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1())), alg=jose.ES256)


def test_the_retry_after_of_an_error_answer_is_kept() -> None:
    net = network()
    with pytest.raises(messages.Error) as raised:
        net._check_response(error_answer(429, "rateLimited", "7200"))
    assert net.last_retry_after_s == 7200.0
    issue = _issue_error(raised.value, net.last_retry_after_s)
    assert issue.retry_after_s == 7200.0 and "rate limit" in str(issue)


def test_a_rate_limit_without_retry_after_still_waits_at_least_an_hour() -> None:
    net = network()
    with pytest.raises(messages.Error) as raised:
        net._check_response(error_answer(429, "rateLimited", None))
    assert net.last_retry_after_s is None
    assert _issue_error(raised.value, None).retry_after_s == RATE_LIMITED_RETRY_S


def test_other_errors_keep_the_servers_retry_after_or_none() -> None:
    net = network()
    with pytest.raises(messages.Error) as raised:
        net._check_response(error_answer(400, "malformed", None))
    issue = _issue_error(raised.value, net.last_retry_after_s)
    assert issue.retry_after_s is None and "malformed" in str(issue)
