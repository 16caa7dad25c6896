"""One reader's answers: an append-only, hash-chained JSON-lines file.

Each line is a record chained to the previous one as manifest rows are
(:func:`synthlesion.provenance.manifest.encode_record`); the first is chained to the study id,
so a file copied from another study, edited, reordered or cut short is refused with the file and
the line named. Records::

    {"type": "session", "reader": R, "token": T, "time": ...}   first line: who owns the id
    {"type": "answer", "case": ID, "answer": "real"|"synthetic", "confidence": 1-5, "time": ...}
    {"type": "submit", "time": ...}                               last: no changes after it

The latest answer per case counts. Every append is flushed and fsynced before the server
replies, so an answer acknowledged to the page survives a crash or a reload.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synthlesion.provenance.manifest import encode_record, split_line
from synthlesion.reader_study.errors import AnswersError, ReaderConflict, StudyError

logger = logging.getLogger(__name__)

READER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ANSWERS = ("real", "synthetic")


def check_reader_id(reader: str) -> str:
    """A reader id is 1-64 of ``A-Z a-z 0-9 _ . -`` (it names the answers file)."""
    if not isinstance(reader, str) or not READER_ID.fullmatch(reader) or ".." in reader:
        raise StudyError(
            f"reader id {reader!r}: use 1-64 letters, digits, '_', '.' or '-' (it names a file)"
        )
    return reader


class AnswerLog:
    """The answers of one reader in one study.

    Args:
        path: ``answers/<reader>.jsonl``.
        study_id: The study the answers belong to (the chain's start).
        cases: The study's case ids (answers to other ids are refused).
    """

    def __init__(self, path: str | Path, study_id: str, cases: list[str]) -> None:
        self.path = Path(path)
        self.study_id = study_id
        self.cases = set(cases)
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.head = study_id
        self.torn = 0  # bytes of an unfinished last line (a crash mid-append)
        self.valid_bytes = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        previous = self.study_id
        records = []
        with open(self.path, "rb") as handle:
            lines = handle.readlines()
        for number, raw in enumerate(lines, start=1):
            if number == len(lines) and not raw.endswith(b"\n"):
                # never acknowledged: the server replies only after the whole line is synced
                logger.warning("%s line %d: an unfinished line (a crash while saving) is "
                               "ignored; it was never acknowledged", self.path, number)  # fmt: skip
                self.torn = len(raw)
                break
            parts = split_line(raw.rstrip(b"\n"))
            if parts is None:
                raise AnswersError(f"{self.path} line {number}: not a line the server wrote")
            body, stored = parts
            _, digest = encode_record(json.loads(body), previous)
            if digest != stored:
                raise AnswersError(
                    f"{self.path} line {number}: the hash chain breaks here (the file was "
                    "edited by hand, reordered, or comes from another study); answers are "
                    "only written by the server"
                )
            records.append(json.loads(body))
            previous = digest
            self.valid_bytes += len(raw)
        if records and records[0].get("type") != "session":
            raise AnswersError(f"{self.path} line 1: does not open a session")
        if records and records[0].get("reader") != self.path.stem:
            raise AnswersError(
                f"{self.path}: the answers of reader {records[0].get('reader')!r} under another "
                "reader's file name (copied or renamed); answers are only written by the server"
            )
        self.records, self.head = records, previous

    # -- state ---------------------------------------------------------------------------------
    @property
    def reader(self) -> str | None:
        return self.records[0]["reader"] if self.records else None

    @property
    def token(self) -> str | None:
        return self.records[0]["token"] if self.records else None

    @property
    def submitted(self) -> bool:
        return any(r["type"] == "submit" for r in self.records)

    def answers(self) -> dict[str, dict[str, Any]]:
        """Case id -> its latest answer record."""
        latest: dict[str, dict[str, Any]] = {}
        for record in self.records:
            if record["type"] == "answer":
                latest[record["case"]] = record
        return latest

    # -- writing -------------------------------------------------------------------------------
    def _append(self, record: Mapping[str, Any]) -> None:
        line, digest = encode_record(record, self.head)
        if self.torn:  # drop the unfinished line a crash left before writing after it
            with open(self.path, "r+b") as handle:
                handle.truncate(self.valid_bytes)
            self.torn = 0
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(dict(record))
        self.head = digest

    def open_session(self, reader: str, token: str) -> None:
        """Claim the reader id for ``token`` (a browser's), or resume its session."""
        check_reader_id(reader)
        if not isinstance(token, str) or not 16 <= len(token) <= 128:
            raise StudyError("a session token of 16-128 characters is needed")
        with self.lock:
            if not self.records:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._append({"type": "session", "reader": reader, "token": token,
                              "time": _now()})  # fmt: skip
            elif self.token != token:
                raise ReaderConflict(
                    f"reader id {reader!r} is already taken by another session of this study; "
                    "choose another reader id (or continue in the browser that started it)"
                )

    def answer(self, token: str, case: str, answer: str, confidence: int) -> None:
        """Record (or change) the answer to ``case``."""
        if not isinstance(case, str) or case not in self.cases:
            raise StudyError(f"case {case!r} is not in this study")
        if answer not in ANSWERS:
            raise StudyError(f"answer {answer!r} must be one of {ANSWERS}")
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, int)
            or not 1 <= confidence <= 5
        ):
            raise StudyError(f"confidence {confidence!r} must be an integer 1-5")
        with self.lock:
            self._check_token(token)
            if self.submitted:
                raise StudyError(f"reader {self.reader!r} has submitted; answers are final")
            self._append({"type": "answer", "case": case, "answer": answer,
                          "confidence": confidence, "time": _now()})  # fmt: skip

    def submit(self, token: str) -> None:
        """Make the answers final (every case must be answered)."""
        with self.lock:
            self._check_token(token)
            if self.submitted:
                return
            missing = self.cases - set(self.answers())
            if missing:
                raise StudyError(f"{len(missing)} case(s) are not answered yet")
            self._append({"type": "submit", "time": _now()})

    def _check_token(self, token: str) -> None:
        if not self.records:
            raise StudyError("no session: enter a reader id first")
        if token != self.token:
            raise ReaderConflict(f"reader id {self.reader!r} belongs to another session")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
