"""The Streamlit web app. Pages call services only."""
