#!/usr/bin/env python
"""The UniHetero objective ablation: every arm x data size x seed, trained and evaluated.

    python tools/run_ablation.py [--arms ...] [--data-sizes 500,1000,2000] [--seeds 0,1] \\
        [--steps-per-sample 0.1] [--output docs/ablation] [--data DIR] [--jobs 1]

See megatron_unihetero/ablation/ (cli.py for every option, runner.py for what "data size" means).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.ablation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
