"""What every page shares: the opened project, the annotator's name, cached reads.

The project is opened once per server process (``st.cache_resource``) and never mutated
per user; per-user state lives in ``st.session_state`` only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

from annotator.errors import AnnotatorError
from annotator.services.project import Project, open_project
from annotator.services.summary import ProjectSummary, project_summary

ANNOTATOR_KEY = "annotator"
_ANNOTATOR_INPUT_KEY = "annotator_input"


def project_dir() -> Path:
    """Return the project folder from ANNOTATOR_PROJECT or the script arguments."""
    value = os.environ.get("ANNOTATOR_PROJECT")
    if not value and len(sys.argv) > 1:
        value = sys.argv[1]
    if not value:
        st.error(
            "No project folder given. Start the app with `annotator serve PROJECT_DIR` "
            "or `annotator demo`."
        )
        st.stop()
    return Path(value)


@st.cache_resource(show_spinner="Opening the project…")
def _open(directory: str) -> Project:
    return open_project(Path(directory))


def current_project() -> Project:
    """Return the opened project, or show the error and stop the page."""
    try:
        return _open(str(project_dir().resolve()))
    except AnnotatorError as error:
        st.error(str(error))
        st.stop()


def summary(project: Project) -> ProjectSummary:
    return project_summary(project)


def sidebar(project: Project) -> str:
    """Draw the shared sidebar and return the annotator's name ("" until entered)."""
    with st.sidebar:
        st.subheader(project.config.name)
        # Widget state is dropped when a page does not draw the widget, so the name is
        # kept under a plain session key and copied into the input on every page.
        st.session_state.setdefault(ANNOTATOR_KEY, "")
        st.session_state[_ANNOTATOR_INPUT_KEY] = st.session_state[ANNOTATOR_KEY]
        st.text_input(
            "Your name",
            key=_ANNOTATOR_INPUT_KEY,
            on_change=_remember_name,
            help="Labels are recorded under this name.",
            placeholder="e.g. alice",
        )
        info = summary(project)
        st.caption(
            f"{info.labelled_pool} pool labels · {info.labelled_evaluation} evaluation labels · "
            f"{info.rounds - 1 if info.rounds else 0} refits · strategy {info.strategy}"
        )
        if info.latest_accuracy is not None:
            st.metric("Accuracy on the evaluation split", f"{100 * info.latest_accuracy:.1f}%")
        if info.skipped:
            st.warning(f"{info.skipped} files could not be used; the Pool page lists why.")
    return str(st.session_state[ANNOTATOR_KEY]).strip()


def _remember_name() -> None:
    st.session_state[ANNOTATOR_KEY] = st.session_state[_ANNOTATOR_INPUT_KEY]
