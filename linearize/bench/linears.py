"""The nn.Linear kernel both models of a bench run (`--linears`, BenchSettings.linears): "decode" (one-token
products split over the CPU threads, ops/decode_linear.py; a CPU kernel) or "stock" (torch's nn.Linear).
Its own module because both the bench's runner (run.py) and its one-point measurement (measure.py) need it."""

LINEARS = ("decode", "stock")
