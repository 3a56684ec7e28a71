"""Pages of the web app, one file each."""
