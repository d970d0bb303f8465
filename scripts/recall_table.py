"""docs/results/recall.json and recall.md: where a converted model loses recall (linearize/evaluate/recall_table.py).

    python scripts/recall_table.py --run runs/smollm2 [--keep 0,2,4,8,15,30] [--select transfer,recall] ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.errors import LinearizeError  # noqa: E402
from linearize.evaluate.recall_table import main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except LinearizeError as e:
        sys.exit(f"error: {e}")
