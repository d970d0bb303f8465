"""What lets transformers open a converted folder without `import linearize`: config.json's `auto_map` names
the classes in a small modeling file saved next to it, which imports them from the installed `linearize`.

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # also pipeline(), lm_eval --model hf

transformers copies the file into its modules cache and imports it; the classes it gets are linearize's own.
"""

from pathlib import Path

MODELING_MODULE = "modeling_linearized"
MODELING_FILE = f"{MODELING_MODULE}.py"
AUTO_MAP = {
    "AutoConfig": f"{MODELING_MODULE}.LinearizedConfig",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.LinearizedForCausalLM",
}
MODELING_SOURCE = '''"""A model converted by linearize: its classes come from the installed package `linearize`.
Load with AutoModelForCausalLM.from_pretrained(this_folder, trust_remote_code=True) after `pip install linearize`."""

from linearize.models.linearized import LinearizedConfig, LinearizedForCausalLM

__all__ = ["LinearizedConfig", "LinearizedForCausalLM"]
'''


def write_modeling_file(folder: str | Path) -> None:
    """Write MODELING_FILE into `folder` (atomically)."""
    from ..run_folder import write_text

    write_text(MODELING_SOURCE, Path(folder) / MODELING_FILE)
