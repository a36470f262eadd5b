"""End-to-end benchmark: lorafuse vs transformers+peft+bitsandbytes vs Unsloth (see lorafuse/bench.py).

python benchmarks/bench.py --shape llama2-7b --batch 4 --seq 512      # same as `lorafuse bench ...`
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lorafuse, installed or not

from lorafuse.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
