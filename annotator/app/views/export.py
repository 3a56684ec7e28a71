"""Export page: download the labelled set or write it into the project folder."""

from __future__ import annotations

import streamlit as st

from annotator.app.context import current_project, sidebar
from annotator.errors import AnnotatorError
from annotator.services.export import ExportFormat, export_labels, labelled_frame


def main() -> None:
    project = current_project()
    sidebar(project)
    st.title("Export")

    include_evaluation = st.checkbox("Include the evaluation split's labels", value=True)
    frame = labelled_frame(project, include_evaluation=include_evaluation)
    st.write(f"{len(frame)} labelled images.")
    st.dataframe(frame.head(200), hide_index=True)
    st.download_button(
        "Download CSV",
        frame.to_csv(index=False).encode("utf-8"),
        file_name=f"{project.config.name}-labels.csv",
        mime="text/csv",
        disabled=frame.empty,
    )

    st.subheader("Write into the project folder")
    export_format = st.selectbox("Format", [f.value for f in ExportFormat], index=0)
    if st.button("Export", disabled=frame.empty):
        suffix = "" if export_format == ExportFormat.FOLDERS else f".{export_format}"
        target = project.exports_dir / f"{project.config.name}-labels{suffix}"
        try:
            result = export_labels(
                project,
                target,
                export_format,
                include_evaluation=include_evaluation,
                overwrite=True,
            )
        except (AnnotatorError, OSError) as error:
            st.error(f"Export failed, nothing was written: {error}")
        else:
            st.success(f"Wrote {result.rows} labelled images to {result.path}")


main()
