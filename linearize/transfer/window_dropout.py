"""Scheduled sliding-window dropout for attention transfer (the idea of Benfeghoul et al. 2025): a hybrid of a
softmax window and a linear memory, trained to match the teacher, can match it with the window alone and leave the
memory untrained. With probability p at a training step, a layer runs that step with its window shrunk to the
current token (layers/linear_attention.py: DROPPED_WINDOW; the sinks stay): the memory then has to carry every
other token the teacher attends to. p falls linearly from `probability` at the stage's first step to 0 at its last,
so the stage ends on the attention the model is used with.

    dropout = WindowDropout(0.5, seed=0)
    dropout.set(students, step, total_steps)   # before each step: draws per layer, deterministic in (seed, step)
    dropout.clear(students)                    # after the stage
"""

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowDropout:
    probability: float  # at the stage's first step; 0 at its last
    seed: int = 0

    def probability_at(self, step: int, total_steps: int) -> float:
        return self.probability * (1 - step / max(total_steps - 1, 1))

    def set(self, students, step: int, total_steps: int) -> list[bool]:
        """Drop each student's window at this step with probability_at(step); returns who was dropped. The draws
        depend on (seed, step) alone, so a resumed stage draws as an uninterrupted one."""
        rng = random.Random(f"window-dropout-{self.seed}-{step}")
        p = self.probability_at(step, total_steps)
        dropped = [rng.random() < p for _ in students]
        for student, drop in zip(students, dropped):
            student.window_dropped = drop
        return dropped

    @staticmethod
    def clear(students):
        for student in students:
            student.window_dropped = False
