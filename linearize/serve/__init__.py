"""`linearize serve`: an OpenAI-compatible server with reusable decoding states (engine.py, app.py); `linearize
serve-bench`: a bounded load test of it (load_test.py)."""
