"""Entry point of the web app: ``annotator serve PROJECT_DIR`` runs it with Streamlit.

The project folder comes from the ``ANNOTATOR_PROJECT`` environment variable, or from the
first argument after ``--`` on the ``streamlit run`` command line.
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="annotator", page_icon=":label:", layout="wide")

navigation = st.navigation(
    [
        st.Page("views/label.py", title="Label", icon=":material/label:", default=True),
        st.Page("views/progress.py", title="Progress", icon=":material/monitoring:"),
        st.Page("views/pool.py", title="Pool", icon=":material/photo_library:"),
        st.Page("views/export.py", title="Export", icon=":material/download:"),
    ]
)
navigation.run()
