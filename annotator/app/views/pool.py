"""Pool page: what was ingested, what was skipped and why, and the top of the ranking."""

from __future__ import annotations

import streamlit as st

from annotator.app.context import current_project, sidebar
from annotator.services.summary import (
    describe_factor_source,
    project_summary,
    skipped_images,
    top_of_ranking,
)


def main() -> None:
    project = current_project()
    sidebar(project)
    st.title("Pool")

    info = project_summary(project)
    columns = st.columns(4)
    columns[0].metric("Usable images", info.usable)
    columns[1].metric("Skipped files", info.skipped)
    columns[2].metric("Evaluation split", info.evaluation)
    columns[3].metric("Labelled", info.labelled_pool + info.labelled_evaluation)
    st.caption(
        f"Model `{info.model}` · posterior factors {describe_factor_source(info.factor_source)}"
    )

    st.subheader("Skipped files")
    skipped = skipped_images(project)
    if skipped.empty:
        st.write("Every file in the image folder could be decoded.")
    else:
        st.write(
            "These files are not in the pool. Fix or replace them and run `annotator ingest` again."
        )
        st.dataframe(skipped, hide_index=True)

    st.subheader("Most informative unlabelled images")
    count = st.slider("Images to list", min_value=10, max_value=200, value=25, step=5)
    st.dataframe(top_of_ranking(project, count), hide_index=True)


main()
