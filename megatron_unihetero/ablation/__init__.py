"""The objective ablation of the UniHetero paper, as a tool (``tools/run_ablation.py``).

The paper's five arms and four semantic variants (one config each in
``examples/configs/ablation/``) trained at several data sizes and seeds, each evaluated on
held-out data; results as CSV / Markdown / PNG.

- :mod:`.arms`: the arms, their configs and the objective switches each must have.
- :mod:`.runner`: the training pool and its subsets, the run plan, one run (train + evaluate
  subprocesses), the launchers (local, torchrun, a SLURM array).
- :mod:`.report`: the slope fit, the results table and the plots.
- :mod:`.cli`: the command line.
- :mod:`.vision_pretrain`: a small self-supervised DINOv2 for the arms
  (``tools/pretrain_vision_encoder.py``).
"""

from megatron_unihetero.ablation.arms import ARMS, PAPER_ARMS, Arm, arm_config_path, check_arm_config  # noqa: F401
from megatron_unihetero.ablation.report import fit_log_slope, write_results  # noqa: F401
