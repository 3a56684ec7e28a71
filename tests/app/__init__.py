"""Tests of the Streamlit app, with AppTest and a real browser."""
