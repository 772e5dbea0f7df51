# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The compiled edge's HTTP/1.1 parsers: llhttp (vendor/llhttp, the release httptools ships) with its
callbacks written in C here, so a parsed head reaches the edge as one call with its method, target and
header list, instead of one Python call per URL piece, header and getter.

The interface and its pure-Python twin (on httptools, for the pure edge) are in gateway/edge/http1.py;
both parsers raise httptools' exceptions, with the same messages, so the edge handles them as one.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy

cdef extern from "<strings.h>":
    int strncasecmp(const char *a, const char *b, size_t n)

from gateway.edge import http1
from gateway.edge.headers import REQUEST_NAME_CLASSES
from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidStatusError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
)


cdef extern from "llhttp.h":
    struct llhttp__internal_s:
        int32_t error
        const char *reason
        void *data
        uint8_t method
        uint8_t http_major
        uint8_t http_minor
        uint64_t content_length
        uint8_t upgrade
        uint16_t status_code
    ctypedef llhttp__internal_s llhttp_t

    ctypedef int (*llhttp_data_cb)(llhttp_t*, const char *at, size_t length) noexcept
    ctypedef int (*llhttp_cb)(llhttp_t*) noexcept

    struct llhttp_settings_s:
        llhttp_cb on_message_begin
        llhttp_data_cb on_url
        llhttp_data_cb on_header_field
        llhttp_data_cb on_header_value
        llhttp_cb on_header_value_complete
        llhttp_cb on_headers_complete
        llhttp_data_cb on_body
        llhttp_cb on_message_complete
    ctypedef llhttp_settings_s llhttp_settings_t

    ctypedef enum llhttp_type_t:
        HTTP_REQUEST
        HTTP_RESPONSE

    ctypedef enum llhttp_errno_t:
        HPE_OK
        HPE_INVALID_METHOD
        HPE_INVALID_URL
        HPE_INVALID_STATUS
        HPE_PAUSED_UPGRADE
        HPE_USER

    ctypedef int llhttp_method_t

    void llhttp_init(llhttp_t*, llhttp_type_t, const llhttp_settings_t*)
    void llhttp_settings_init(llhttp_settings_t*)
    llhttp_errno_t llhttp_execute(llhttp_t*, const char*, size_t)
    int llhttp_should_keep_alive(const llhttp_t*)
    void llhttp_resume_after_upgrade(llhttp_t*)
    const char* llhttp_get_error_pos(const llhttp_t*)
    void llhttp_set_error_reason(llhttp_t*, const char*)
    const char* llhttp_method_name(llhttp_method_t)


# The methods' names as bytes objects, each made the first time it is parsed (llhttp numbers methods
# in a byte; it aborts when asked the name of a number it has no method for).
cdef list _METHODS = [None] * 256


cdef inline object _method(uint8_t number):
    name = _METHODS[number]
    if name is None:
        name = _METHODS[number] = <bytes>llhttp_method_name(<llhttp_method_t>number)
    return name

# Trailers of a response that had none (read only).
cdef list _NO_TRAILERS = []

# What a response head's names say about its framing (gateway/edge/upstream.py): bit flags.
# (The values are http1.py's, the interface's: one definition for both parsers.)
cdef int NAME_CONTENT_LENGTH = http1.NAME_CONTENT_LENGTH
cdef int NAME_TRANSFER_ENCODING = http1.NAME_TRANSFER_ENCODING
cdef int NAME_HOP_BY_HOP = http1.NAME_HOP_BY_HOP

# Request header names the edge acts on, by class (gateway/edge/headers.py's table, copied here once so
# a name is compared where it lies: by length, then case-insensitively).
cdef enum:
    _MAX_CLASSED = 64
cdef const char *_class_names[_MAX_CLASSED]
cdef size_t _class_lens[_MAX_CLASSED]
cdef uint8_t _class_codes[_MAX_CLASSED]
cdef int _class_count = 0
cdef list _class_keep = list(REQUEST_NAME_CLASSES)  # (the names the arrays point into)
if len(_class_keep) > _MAX_CLASSED:
    raise RuntimeError("more request header classes than http1c holds")
for _name in _class_keep:
    _class_names[_class_count] = PyBytes_AS_STRING(_name)
    _class_lens[_class_count] = PyBytes_GET_SIZE(_name)
    _class_codes[_class_count] = REQUEST_NAME_CLASSES[_name]
    _class_count += 1


cdef inline uint8_t _request_class(bytes name) noexcept:
    cdef const char *at = PyBytes_AS_STRING(name)
    cdef size_t n = PyBytes_GET_SIZE(name)
    cdef int i
    for i in range(_class_count):
        if _class_lens[i] == n and strncasecmp(_class_names[i], at, n) == 0:
            return _class_codes[i]
    return 0


cdef bytes _request_classes(list headers):
    """headers.request_name_classes, in C: a byte per header."""
    cdef Py_ssize_t count = PyList_GET_SIZE(headers)
    cdef bytes classes = PyBytes_FromStringAndSize(NULL, count)
    cdef char *out = PyBytes_AS_STRING(classes)
    cdef Py_ssize_t i
    for i in range(count):
        out[i] = <char>_request_class(<bytes>PyTuple_GET_ITEM(<tuple>PyList_GET_ITEM(headers, i), 0))
    return classes


cdef class _Parser:
    """What the two parsers share: llhttp's state, the header being read, the head's list."""

    cdef llhttp_t parser
    cdef object error  # what an owner's callback raised, raised again by feed_data
    cdef bint callback_failed  # a callback here stopped the parse (an error, or a limit the owner heard of)
    cdef object begin_cb
    cdef object body_cb
    cdef list headers
    cdef char *field
    cdef size_t field_len
    cdef size_t field_cap
    cdef char *value
    cdef size_t value_len
    cdef size_t value_cap
    cdef Py_ssize_t header_bytes
    # The read being parsed: a body span that is all of it is passed on as it is, not copied (in a
    # long upload or download, every read after the first is all body).
    cdef bytes feeding

    def __dealloc__(self):
        PyMem_Free(self.field)
        PyMem_Free(self.value)

    cdef void _setup(self, llhttp_type_t kind, const llhttp_settings_t *settings, owner):
        self.begin_cb = owner.on_message_begin
        self.body_cb = owner.on_body
        self.headers = []
        llhttp_init(&self.parser, kind, settings)
        self.parser.data = <void*>self

    cdef int _grow(self, char **buf, size_t *cap, size_t need) except -1:
        cdef size_t size = cap[0] * 2 if cap[0] else 64
        while size < need:
            size *= 2
        cdef char *grown = <char*>PyMem_Realloc(buf[0], size)
        if grown == NULL:
            raise MemoryError()
        buf[0] = grown
        cap[0] = size
        return 0

    cdef int _header_done(self) except -1:
        """The header just read joins the list (the subclasses check and classify it)."""
        name = PyBytes_FromStringAndSize(self.field, self.field_len)
        value = PyBytes_FromStringAndSize(self.value, self.value_len)
        if self.headers is None:  # a chunked request's trailers, after its head was handed over
            self.headers = []
        self.headers.append((name, value))
        self.header_bytes += self.field_len + self.value_len
        self.field_len = 0
        self.value_len = 0
        return 0

    def feed_data(self, bytes data not None):
        cdef const char *start = PyBytes_AS_STRING(data)
        self.feeding = data
        cdef llhttp_errno_t err = llhttp_execute(&self.parser, start, PyBytes_GET_SIZE(data))
        self.feeding = None
        if err == HPE_OK:
            return
        if err == HPE_PAUSED_UPGRADE and self.parser.upgrade == 1:
            # As httptools does: the parser is freed at once, and the rest of the read is the tunnel's.
            offset = llhttp_get_error_pos(&self.parser) - start
            llhttp_resume_after_upgrade(&self.parser)
            raise HttpParserUpgrade(offset)
        reason = (<bytes>self.parser.reason).decode("latin-1")
        if self.callback_failed:
            exc = HttpParserCallbackError(reason)
            exc.__context__, self.error = self.error, None
            raise exc
        if err == HPE_INVALID_STATUS:
            raise HttpParserInvalidStatusError(reason)
        if err == HPE_INVALID_METHOD:
            raise HttpParserInvalidMethodError(reason)
        if err == HPE_INVALID_URL:
            raise HttpParserInvalidURLError(reason)
        raise HttpParserError(reason)


cdef class RequestParser(_Parser):
    """Calls its owner's ``on_message_begin()``, ``on_request(method, target, headers, keep_alive,
    upgrade, http10, classes)``, ``on_body(data)``, ``on_message_complete()``, and ``on_head_limit(code)``
    when the target or the headers pass the limits (the parse then fails)."""

    cdef object request_cb
    cdef object complete_cb
    cdef object limit_cb
    cdef bytes url
    cdef Py_ssize_t max_target
    cdef Py_ssize_t max_count
    cdef Py_ssize_t max_bytes

    def __init__(self, owner, Py_ssize_t max_target, Py_ssize_t max_count, Py_ssize_t max_bytes):
        self._setup(HTTP_REQUEST, &_REQUEST_SETTINGS, owner)
        self.request_cb = owner.on_request
        self.complete_cb = owner.on_message_complete
        self.limit_cb = owner.on_head_limit
        self.url = b""
        self.max_target = max_target
        self.max_count = max_count
        self.max_bytes = max_bytes

    def parsed_bytes(self):
        """The target's and headers' bytes of the head being read, so far."""
        return PyBytes_GET_SIZE(self.url) + self.header_bytes


cdef class ResponseParser(_Parser):
    """Calls its owner's ``on_message_begin()``, ``on_response(status, headers, keep_alive, names,
    length)`` (``names``: NAME_* bits of what the head's names were; ``length``: the Content-Length, or
    -1), ``on_body(data)`` and
    ``on_message_complete(trailers)``; headers after the head are the trailers."""

    cdef object response_cb
    cdef object complete_cb
    cdef bint in_trailers
    cdef int names
    cdef tuple hop_by_hop  # lower-case names

    def __init__(self, owner, hop_by_hop):
        self._setup(HTTP_RESPONSE, &_RESPONSE_SETTINGS, owner)
        self.response_cb = owner.on_response
        self.complete_cb = owner.on_message_complete
        self.hop_by_hop = tuple(hop_by_hop)

    cdef int _classify(self):
        """NAME_* bits for the header name just read (case-insensitive, no copy)."""
        cdef size_t n = self.field_len
        if n == 14 and strncasecmp(self.field, b"content-length", 14) == 0:
            return NAME_CONTENT_LENGTH
        if n == 17 and strncasecmp(self.field, b"transfer-encoding", 17) == 0:
            return NAME_TRANSFER_ENCODING | NAME_HOP_BY_HOP
        cdef bytes name
        for name in self.hop_by_hop:
            if <size_t>PyBytes_GET_SIZE(name) == n and strncasecmp(self.field, PyBytes_AS_STRING(name), n) == 0:
                return NAME_HOP_BY_HOP
        return 0


# llhttp's callbacks: C, with the parser object in ``data``; a Python error is kept for feed_data.

cdef inline int _fail(_Parser self, llhttp_t *p, const char *why) noexcept:
    self.callback_failed = True
    llhttp_set_error_reason(p, why)
    return HPE_USER


cdef inline int _raised(_Parser self, exc) noexcept:
    """An owner's call raised: the parse stops (llhttp says which callback), feed_data raises."""
    self.callback_failed = True
    self.error = exc
    return -1


cdef int _on_message_begin(llhttp_t *p) noexcept:
    cdef _Parser self = <_Parser>p.data
    self.headers = []
    self.header_bytes = 0
    self.field_len = 0
    self.value_len = 0
    if isinstance(self, RequestParser):
        (<RequestParser>self).url = b""
    else:
        (<ResponseParser>self).in_trailers = False
        (<ResponseParser>self).names = 0
    try:
        self.begin_cb()
    except BaseException as exc:
        return _raised(self, exc)
    return 0


cdef int _on_url(llhttp_t *p, const char *at, size_t length) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    try:
        piece = PyBytes_FromStringAndSize(at, length)
        self.url = piece if PyBytes_GET_SIZE(self.url) == 0 else self.url + piece
        if PyBytes_GET_SIZE(self.url) > self.max_target:
            self.limit_cb("uri_too_long")
            return _fail(self, p, "request target too long")
    except BaseException as exc:
        self.error = exc
        return _fail(self, p, "`on_url` callback error")
    return 0


cdef int _append(_Parser self, llhttp_t *p, char **buf, size_t *used, size_t *cap, const char *at,
                 size_t length) noexcept:
    """A piece of the header name or value being read (a line can come in several reads)."""
    try:
        if used[0] + length > cap[0]:
            self._grow(buf, cap, used[0] + length)
    except BaseException as exc:
        self.error = exc
        return _fail(self, p, "header callback error")
    memcpy(buf[0] + used[0], at, length)
    used[0] += length
    return 0


cdef int _on_header_field(llhttp_t *p, const char *at, size_t length) noexcept:
    cdef _Parser self = <_Parser>p.data
    return _append(self, p, &self.field, &self.field_len, &self.field_cap, at, length)


cdef int _on_header_value(llhttp_t *p, const char *at, size_t length) noexcept:
    cdef _Parser self = <_Parser>p.data
    return _append(self, p, &self.value, &self.value_len, &self.value_cap, at, length)


cdef int _on_request_header(llhttp_t *p) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    try:
        self._header_done()
        if len(self.headers) > self.max_count or self.header_bytes > self.max_bytes:
            self.limit_cb("headers_too_large")
            return _fail(self, p, "headers too large")
    except BaseException as exc:
        self.error = exc
        return _fail(self, p, "`on_header_value` callback error")
    return 0


cdef int _on_request_head(llhttp_t *p) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    url, headers = self.url, self.headers
    self.url, self.headers = b"", None  # an idle connection keeps nothing of its last request
    self.header_bytes = 0
    try:
        self.request_cb(
            _method(p.method), url, headers, llhttp_should_keep_alive(p) != 0,
            p.upgrade != 0, p.http_major == 1 and p.http_minor == 0, _request_classes(headers),
        )
    except BaseException as exc:
        return _raised(self, exc)
    return 1 if p.upgrade else 0


cdef int _on_body(llhttp_t *p, const char *at, size_t length) noexcept:
    cdef _Parser self = <_Parser>p.data
    cdef bytes feeding = self.feeding
    try:
        if (feeding is not None and at == PyBytes_AS_STRING(feeding)
                and <Py_ssize_t>length == PyBytes_GET_SIZE(feeding)):
            self.body_cb(feeding)
        else:
            self.body_cb(PyBytes_FromStringAndSize(at, length))
    except BaseException as exc:
        self.error = exc
        return _fail(self, p, "`on_body` callback error")
    return 0


cdef int _on_request_complete(llhttp_t *p) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    try:
        self.complete_cb()
    except BaseException as exc:
        return _raised(self, exc)
    return 0


cdef int _on_response_header(llhttp_t *p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    try:
        if not self.in_trailers:
            self.names |= self._classify()
        self._header_done()
    except BaseException as exc:
        self.error = exc
        return _fail(self, p, "`on_header_value` callback error")
    return 0


cdef int _on_response_head(llhttp_t *p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    cdef object length = -1  # (a Python int: -1 next to the uint64 would wrap)
    head = self.headers
    self.headers = None  # what follows (a chunked body's trailers) is a list of its own, made if any
    self.in_trailers = True
    try:
        # (llhttp has read the Content-Length value by now: the body's length, before any of it)
        if self.names & NAME_CONTENT_LENGTH:
            length = p.content_length
        self.response_cb(p.status_code, head, llhttp_should_keep_alive(p) != 0, self.names, length)
    except BaseException as exc:
        return _raised(self, exc)
    return 1 if p.upgrade else 0


cdef int _on_response_complete(llhttp_t *p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    try:
        self.complete_cb(self.headers if self.headers is not None else _NO_TRAILERS)
    except BaseException as exc:
        return _raised(self, exc)
    return 0


# Heads and lines written in one allocation: b"".join takes each piece through the buffer protocol,
# and a %-format parses its format; these only add up lengths and copy.

cdef inline char *_put(char *p, bytes piece):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(piece)
    memcpy(p, PyBytes_AS_STRING(piece), n)
    return p + n


cdef inline int _pair(tuple header) except -1:
    """Checks a header is a (name, value) pair of bytes."""
    if PyTuple_GET_SIZE(header) != 2:
        raise ValueError(f"a header is a (name, value) pair, not {len(header)} items")
    if type(<object>PyTuple_GET_ITEM(header, 0)) is not bytes or type(<object>PyTuple_GET_ITEM(header, 1)) is not bytes:
        raise TypeError("header names and values are bytes")
    return 0


cdef Py_ssize_t _headers_size(list headers) except -1:
    cdef Py_ssize_t size = 0
    cdef tuple header
    for header in headers:
        _pair(header)
        size += (PyBytes_GET_SIZE(<bytes>PyTuple_GET_ITEM(header, 0))
                 + PyBytes_GET_SIZE(<bytes>PyTuple_GET_ITEM(header, 1)) + 4)
    return size


cdef char *_put_headers(char *p, char *end, list headers) except NULL:
    """Writes what _headers_size measured, checked again: a finalizer run by the allocation in
    between could have changed the list."""
    cdef tuple header
    cdef bytes name, value
    for header in headers:
        _pair(header)
        name = <bytes>PyTuple_GET_ITEM(header, 0)
        value = <bytes>PyTuple_GET_ITEM(header, 1)
        if PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4 > end - p:
            raise RuntimeError("the header list changed while it was written")
        p = _put(p, name)
        p[0] = b':'
        p[1] = b' '
        p = _put(p + 2, value)
        p[0] = b'\r'
        p[1] = b'\n'
        p += 2
    if p != end:
        raise RuntimeError("the header list changed while it was written")
    return p


def head_bytes(list headers not None):
    """``name: value\\r\\n`` for each header."""
    cdef Py_ssize_t size = _headers_size(headers)
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char *start = PyBytes_AS_STRING(out)
    _put_headers(start, start + size, headers)
    return out


def request_head(bytes method not None, bytes target not None, list headers not None):
    """A request head: its line, its headers, the blank line."""
    cdef Py_ssize_t size = (
        PyBytes_GET_SIZE(method) + PyBytes_GET_SIZE(target) + 14 + _headers_size(headers)
    )
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char *start = PyBytes_AS_STRING(out)
    cdef char *p = _put(start, method)
    p[0] = b' '
    p = _put(p + 1, target)
    memcpy(p, b" HTTP/1.1\r\n", 11)
    p = _put_headers(p + 11, start + size - 2, headers)
    p[0] = b'\r'
    p[1] = b'\n'
    return out


cdef const char *_HEX = b"0123456789abcdef"


def request_id(bytes prefix not None, unsigned long long n):
    """``prefix-<n in hex>``: one of the edge's request ids."""
    cdef char digits[16]
    cdef int count = 0
    while True:
        digits[count] = _HEX[n & 15]
        count += 1
        n >>= 4
        if n == 0:
            break
    cdef Py_ssize_t size = PyBytes_GET_SIZE(prefix)
    out = PyBytes_FromStringAndSize(NULL, size + 1 + count)
    cdef char *p = _put(PyBytes_AS_STRING(out), prefix)
    p[0] = b'-'
    p += 1
    while count:
        count -= 1
        p[0] = digits[count]
        p += 1
    return out


# Which callbacks each kind of parser has: one table each, shared by every parser (llhttp keeps a
# pointer to it).
cdef llhttp_settings_t _REQUEST_SETTINGS
cdef llhttp_settings_t _RESPONSE_SETTINGS


cdef void _init_settings(llhttp_settings_t *settings):
    llhttp_settings_init(settings)
    settings.on_message_begin = _on_message_begin
    settings.on_header_field = _on_header_field
    settings.on_header_value = _on_header_value
    settings.on_body = _on_body


_init_settings(&_REQUEST_SETTINGS)
_REQUEST_SETTINGS.on_url = _on_url
_REQUEST_SETTINGS.on_header_value_complete = _on_request_header
_REQUEST_SETTINGS.on_headers_complete = _on_request_head
_REQUEST_SETTINGS.on_message_complete = _on_request_complete
_init_settings(&_RESPONSE_SETTINGS)
_RESPONSE_SETTINGS.on_header_value_complete = _on_response_header
_RESPONSE_SETTINGS.on_headers_complete = _on_response_head
_RESPONSE_SETTINGS.on_message_complete = _on_response_complete


# Access lines (gateway/edge/observe.py's log_line writes the same bytes in Python).

cdef char *_put_int(char *p, long long n):
    cdef char digits[24]
    cdef int count = 0
    cdef unsigned long long u
    if n < 0:
        p[0] = b'-'
        p += 1
        u = <unsigned long long>(-(n + 1)) + 1
    else:
        u = <unsigned long long>n
    while True:
        digits[count] = <char>(48 + u % 10)
        count += 1
        u //= 10
        if u == 0:
            break
    while count:
        count -= 1
        p[0] = digits[count]
        p += 1
    return p


cdef char *_put_ms(char *p, long long us):
    """Microseconds as milliseconds with two decimals, divided as Python divides (floor)."""
    cdef long long hundredths = us // 10 % 100
    p = _put_int(p, us // 1000)
    p[0] = b'.'
    p[1] = <char>(48 + hundredths // 10)
    p[2] = <char>(48 + hundredths % 10)
    return p + 3


cdef inline char *_put_text(char *p, const char *text, size_t n):
    memcpy(p, text, n)
    return p + n


cdef char *_put_numbers(char *p, bint json, long long bytes_in, long long bytes_out, upstream_us,
                        long long duration_us) except NULL:
    if json:
        p = _put_text(p, b',"bytes_in":', 12)
        p = _put_int(p, bytes_in)
        p = _put_text(p, b',"bytes_out":', 13)
        p = _put_int(p, bytes_out)
        p = _put_text(p, b',"upstream_ms":', 15)
        p = _put_ms(p, upstream_us) if upstream_us is not None else _put_text(p, b"null", 4)
        p = _put_text(p, b',"duration_ms":', 15)
        p = _put_ms(p, duration_us)
        p = _put_text(p, b"}\n", 2)
    else:
        p = _put_text(p, b" in=", 4)
        p = _put_int(p, bytes_in)
        p = _put_text(p, b" out=", 5)
        p = _put_int(p, bytes_out)
        if upstream_us is not None:
            p = _put_text(p, b" upstream=", 10)
            p = _put_ms(p, upstream_us)
            p = _put_text(p, b"ms ", 3)
        else:
            p = _put_text(p, b" ", 1)
        p = _put_ms(p, duration_us)
        p = _put_text(p, b"ms", 2)
    return p


def log_line(bint json, bytes clock not None, int ms, bytes who not None, bytes path not None,
             bytes what not None, bytes error not None, bytes request_id not None, long long bytes_in,
             long long bytes_out, upstream_us, long long duration_us):
    """One access line from its pieces and numbers, in one allocation (observe.log_line's bytes)."""
    cdef char numbers[256]
    cdef Py_ssize_t n = _put_numbers(numbers, json, bytes_in, bytes_out, upstream_us, duration_us) - numbers
    cdef Py_ssize_t size = (
        PyBytes_GET_SIZE(clock) + PyBytes_GET_SIZE(who) + PyBytes_GET_SIZE(path) + PyBytes_GET_SIZE(what)
        + PyBytes_GET_SIZE(request_id) + n
    )
    if json:
        if ms < 0 or ms > 999:
            raise ValueError("milliseconds are 0 to 999")
        size += 3 + 31 + 1 + 8
    else:
        size += 1 + PyBytes_GET_SIZE(error) + 5 + 1
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char *p = _put(PyBytes_AS_STRING(out), clock)
    if json:
        p[0] = <char>(48 + ms // 100)
        p[1] = <char>(48 + ms // 10 % 10)
        p[2] = <char>(48 + ms % 10)
        p = _put_text(p + 3, b',"type":"access","request_id":"', 31)
        p = _put(p, request_id)
        p = _put_text(p, b'"', 1)
        p = _put(p, who)
        p = _put_text(p, b',"path":', 8)
        p = _put(p, path)
        p = _put(p, what)
        p = _put_text(p, numbers, n)
    else:
        p = _put_text(p, b" ", 1)
        p = _put(p, who)
        p = _put(p, path)
        p = _put(p, what)
        p = _put_text(p, numbers, n)
        p = _put(p, error)
        p = _put_text(p, b" rid=", 5)
        p = _put(p, request_id)
        p = _put_text(p, b"\n", 1)
    return out
