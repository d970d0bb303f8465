"""`linearize serve`: an OpenAI-compatible server with reusable decoding states (engine.py, app.py)."""
