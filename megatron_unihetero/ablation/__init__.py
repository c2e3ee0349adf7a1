"""The objective ablation of the UniHetero paper, as a tool (``tools/run_ablation.py``).

Five arms (one config each in ``examples/configs/ablation/``) trained at several data sizes and
seeds, each evaluated on the held-out split; results as CSV / Markdown / PNG.

- :mod:`.arms`: the arms, their configs and the objective switches each must have.
- :mod:`.runner`: data preparation, the run plan, one run (train + evaluate subprocesses).
- :mod:`.report`: the slope fit, the results table and the plots.
- :mod:`.cli`: the command line.
"""

from megatron_unihetero.ablation.arms import ARMS, Arm, arm_config_path, check_arm_config  # noqa: F401
from megatron_unihetero.ablation.report import fit_log_slope, write_results  # noqa: F401
