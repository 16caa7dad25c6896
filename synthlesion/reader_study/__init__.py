"""A blinded reader study in the browser: can readers tell synthetic lesions from real ones?

``make_study`` draws real and synthetic lesion cases and renders them with opaque ids (the key
stays outside the served folder); ``serve`` runs the local page (standard library HTTP server,
no internet, no external assets); ``score_study`` computes accuracy, sensitivity and
specificity with Wilson intervals, ROC AUC from the confidences, a binomial test against chance
and Fleiss' kappa, per reader, pooled, per generator and per lesion size.
"""

from __future__ import annotations

from synthlesion.reader_study.answers import AnswerLog
from synthlesion.reader_study.errors import AnswersError, ReaderConflict, StudyError
from synthlesion.reader_study.score import score_study
from synthlesion.reader_study.server import make_server
from synthlesion.reader_study.study import load_study, make_study

__all__ = [
    "AnswerLog",
    "AnswersError",
    "ReaderConflict",
    "StudyError",
    "load_study",
    "make_server",
    "make_study",
    "score_study",
]
