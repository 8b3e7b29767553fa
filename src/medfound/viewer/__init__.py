"""``medfound serve``: a small FastAPI service and one static page to look, prompt and download."""
