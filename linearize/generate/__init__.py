"""`linearize generate` and `linearize prefill` (cli.py): constant-memory decoding with a converted model
(decoding.py: prefill, Decoder, generate_text) and its decoding states saved to files (state_file.py)."""
