"""The local web server of a reader study (standard library only; no internet, no CDN).

It serves the study's ``page/`` folder (nothing else of the disk) and a small JSON API:

* ``GET  /api/study``                   the case order and display settings;
* ``POST /api/login``  {reader, token}  claims a reader id for a browser, or resumes it;
* ``POST /api/answer`` {reader, token, case, answer, confidence}  saves one answer;
* ``POST /api/submit`` {reader, token}  makes the reader's answers final.

Answers are appended to ``answers/<reader>.jsonl`` before the reply, so a reload or a crash
loses nothing. Several readers can work at once (one thread per request, one lock per reader).
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from synthlesion.reader_study.answers import AnswerLog, check_reader_id
from synthlesion.reader_study.errors import ReaderConflict, StudyError
from synthlesion.reader_study.study import PAGE_FILES, load_study

logger = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".bin": "application/octet-stream",
    ".mask": "application/octet-stream",
}
CASE_FILE = re.compile(r"/cases/([0-9a-f]{16})\.(json|bin|mask)")
MAX_BODY = 16_384


class StudyState:
    """The study folder and the open answer logs (shared by the request threads)."""

    def __init__(self, study_dir: str | Path) -> None:
        self.dir = Path(study_dir)
        self.study, _ = load_study(self.dir, key=None)
        self.cases: list[str] = list(self.study["cases"])
        self.logs: dict[str, AnswerLog] = {}
        self.lock = threading.Lock()
        answers = self.dir / "answers"
        answers.mkdir(exist_ok=True)
        self.lock_file = open(answers / ".serving.lock", "a+b")  # noqa: SIM115 - held while serving
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock_file.close()
            raise StudyError(
                f"{self.dir} is already being served by another process; two servers would "
                "interleave the answers files (stop the other one first)"
            ) from None
        for path in sorted(answers.glob("*.jsonl")):  # refuse a broken file before serving
            try:
                self.log(path.stem)
            except StudyError as exc:
                if str(path) in str(exc):
                    raise
                raise type(exc)(f"{path}: {exc}") from None

    def log(self, reader: str) -> AnswerLog:
        check_reader_id(reader)
        with self.lock:
            if reader not in self.logs:
                self.logs[reader] = AnswerLog(
                    self.dir / "answers" / f"{reader}.jsonl", self.study["study_id"], self.cases
                )
            return self.logs[reader]


class Handler(BaseHTTPRequestHandler):
    """Static page files, case views and the JSON API."""

    server_version = "synthlesion-reader-study"
    state: StudyState  # set by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        logger.debug("%s - %s", self.address_string(), format % args)

    # -- replies -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    # -- GET -----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the base's name
        path = self.path.split("?", 1)[0]
        if path == "/api/study":
            self._json(HTTPStatus.OK, {"cases": self.state.cases,
                                       "outline": self.state.study.get("outline", False)})  # fmt: skip
            return
        if path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
            return
        page = self.state.dir / "page"
        name = "index.html" if path == "/" else path.lstrip("/")
        if name in PAGE_FILES:
            self._file(page / name)
            return
        match = CASE_FILE.fullmatch(path)
        if match and match.group(1) in self.state.cases:
            self._file(page / "cases" / f"{match.group(1)}.{match.group(2)}")
            return
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _file(self, path: Path) -> None:
        try:
            body = path.read_bytes()
        except OSError:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        self._send(HTTPStatus.OK, body, CONTENT_TYPES.get(path.suffix, "application/octet-stream"))

    # -- POST ----------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802 - the base's name
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise StudyError("request body missing or too large")
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise StudyError("the request body must be a JSON object")
            reply = self._api(self.path, body)
        except ReaderConflict as exc:
            self._json(HTTPStatus.CONFLICT, {"error": str(exc)})
        except (StudyError, ValueError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except Exception as exc:  # noqa: BLE001 - the page gets a reply, the log the details
            logger.exception("reader study: request %s failed", self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"server error: {exc}"})
        else:
            self._json(HTTPStatus.OK, reply)

    def _api(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reader, token = body.get("reader"), body.get("token")
        log = self.state.log(reader) if isinstance(reader, str) else None
        if log is None:
            raise StudyError("a reader id is needed")
        if path == "/api/login":
            log.open_session(reader, token)
        elif path == "/api/answer":
            log.answer(token, body.get("case"), body.get("answer"), body.get("confidence"))
        elif path == "/api/submit":
            log.submit(token)
        else:
            raise StudyError(f"unknown endpoint {path}")
        answers = {
            case: {"answer": r["answer"], "confidence": r["confidence"]}
            for case, r in log.answers().items()
        }
        return {"cases": self.state.cases, "answers": answers, "submitted": log.submitted}


def make_server(
    study_dir: str | Path, host: str = "127.0.0.1", port: int = 8765
) -> ThreadingHTTPServer:
    """A server for the study (call ``serve_forever``); ``port=0`` picks a free port.

    Raises:
        StudyError: not a study folder, or an answers file that fails its hash chain.
    """
    state = StudyState(study_dir)
    handler = type("StudyHandler", (Handler,), {"state": state})
    server_class = type("StudyServer", (ThreadingHTTPServer,), {"request_queue_size": 128})
    try:
        server = server_class((host, port), handler)
    except OSError as exc:
        state.lock_file.close()
        raise StudyError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose "
                         "another --port") from None  # fmt: skip
    server.daemon_threads = True
    closing = server.server_close

    def server_close() -> None:
        closing()
        state.lock_file.close()  # releases the serving lock

    server.server_close = server_close  # type: ignore[method-assign]
    return server
