"""Label page: the current batch of most informative images, one class per image."""

from __future__ import annotations

import math

import streamlit as st

from annotator.app.context import current_project, sidebar
from annotator.errors import AnnotatorError
from annotator.services.batches import BatchTask, BatchView, next_batch, submit_batch

COLUMNS = 4
NOTICE_KEY = "label_notice"


def _task_caption(task: BatchTask) -> str:
    if task.purpose == "evaluation":
        kind = "**evaluation** (measures accuracy; never trains the model)"
    else:
        kind = "**informative**"
    guesses = " · ".join(
        f"{name} {100 * prob:.0f}%"
        for name, prob in zip(task.top_classes[:3], task.top_probs[:3], strict=False)
    )
    lines = [kind]
    if guesses:
        lines.append(f"model: {guesses}")
    if not math.isnan(task.epistemic):
        lines.append(f"epistemic uncertainty {task.epistemic:.3f} nats")
    # BALD strategies score by the epistemic uncertainty itself; show other scores too.
    if task.score is not None and not math.isclose(task.score, task.epistemic, rel_tol=1e-4):
        lines.append(f"acquisition score {task.score:.3f}")
    return "  \n".join(lines)


def _label_key(batch: BatchView, task: BatchTask) -> str:
    return f"label-{batch.batch_id}-{task.image_id}"


def _draw_batch(batch: BatchView, class_names: list[str]) -> bool:
    with st.form(f"batch-{batch.batch_id}"):
        columns = st.columns(COLUMNS)
        for position, task in enumerate(batch.tasks):
            with columns[position % COLUMNS]:
                st.image(
                    task.path,
                    width=140,
                    caption=f"#{position + 1} · {task.path.rsplit('/', 1)[-1]}",
                )
                st.markdown(_task_caption(task))
                st.selectbox(
                    f"Class of image #{position + 1}",
                    class_names,
                    index=None,
                    placeholder="Choose a class",
                    key=_label_key(batch, task),
                )
        return st.form_submit_button("Submit batch", type="primary")


def _submit(project, batch: BatchView) -> None:
    chosen = {task.image_id: st.session_state.get(_label_key(batch, task)) for task in batch.tasks}
    missing = [str(i + 1) for i, task in enumerate(batch.tasks) if not chosen[task.image_id]]
    if missing:
        st.error(f"Choose a class for image(s) #{', #'.join(missing)} before submitting.")
        return
    try:
        with st.spinner("Saving labels, refitting the head and re-ranking the pool…"):
            result = submit_batch(project, batch.batch_id, chosen)
    except AnnotatorError as error:
        st.error(f"The labels were not saved: {error}")
        return
    message = f"Saved {result.labels_written} labels."
    if result.refit_error:
        st.session_state[NOTICE_KEY] = (
            "warning",
            f"{message} The refit failed: {result.refit_error}",
        )
    elif result.round is not None:
        bayes = result.round.metrics.get("bayes")
        accuracy = (
            f" Accuracy on the evaluation split: {100 * bayes['accuracy']:.1f}%." if bayes else ""
        )
        st.session_state[NOTICE_KEY] = (
            "success",
            f"{message} Round {result.round.index}: refit on {result.round.labels_spent} labels "
            f"in {result.round.refit_seconds:.2f} s and re-ranked the pool.{accuracy}",
        )
    else:
        st.session_state[NOTICE_KEY] = ("success", f"{message} Evaluation metrics updated.")
    st.rerun()


def main() -> None:
    project = current_project()
    annotator = sidebar(project)
    st.title("Label")

    notice = st.session_state.pop(NOTICE_KEY, None)
    if notice is not None:
        getattr(st, notice[0])(notice[1])

    if not annotator:
        st.info("Enter your name in the sidebar to get a batch of images to label.")
        return
    try:
        batch = next_batch(project, annotator)
    except AnnotatorError as error:
        st.error(str(error))
        return
    if batch is None:
        st.success("Nothing is left to label: every pool image is labelled or in another batch.")
        return

    acquisition = sum(task.purpose == "acquisition" for task in batch.tasks)
    evaluation = len(batch.tasks) - acquisition
    if evaluation:
        mixed = f" and {evaluation} random images for the evaluation split (marked as such)"
    else:
        mixed = " (no evaluation images are due in this batch)"
    st.caption(
        f"Batch {batch.batch_id} for {batch.annotator}: {acquisition} images chosen by "
        f"uncertainty after round {batch.round_index}{mixed}. Pick the class of each image, "
        "then submit."
    )
    if _draw_batch(batch, project.config.class_names):
        _submit(project, batch)


main()
