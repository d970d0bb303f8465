"""`linearize convert`: a causal LM to hybrid linear attention, resumable. cli.py: the command; settings.py: its
settings (ConvertSettings); stages.py: the stages and convert(); run_state.py: the run's folder and progress;
budget.py: token counts from a wall-clock budget (--minutes)."""
