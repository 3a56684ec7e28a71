"""Pages of the web app, one file each (not named pages/, which Streamlit would list on its own)."""
