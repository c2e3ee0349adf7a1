"""Every numeric option is checked before any rank builds a model: a ConfigError naming the key
and its range (pretrain prints it as ``config error:`` and exits with code 2)."""

import pytest

from megatron_unihetero.config_io import ConfigLoadError, load_config
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import RunConfig


@pytest.mark.parametrize("override,message", [
    ("--data.micro_batch_size=0", "data.micro_batch_size must be >= 1; got 0"),
    ("--data.valid_fraction=1.0", r"data.valid_fraction must be in \[0, 1\); got 1.0"),
    ("--data.seq_length=0", "data.seq_length must be >= 1"),
    ("--train.steps=0", "train.steps must be >= 1; got 0"),
    ("--train.grad_accumulation=0", "train.grad_accumulation must be >= 1"),
    ("--train.lr=-0.001", "train.lr must be > 0; got -0.001"),
    ("--train.lr=nan", "train.lr must be > 0; got nan"),
    ("--train.min_lr=1.0", r"train.min_lr must be in \[0, train.lr="),
    ("--train.adam_beta2=1.0", r"train.adam_beta2 must be in \[0, 1\)"),
    ("--checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0"),
    ("--logging.log_interval=0", "logging.log_interval must be >= 1"),
    ("--parallel.timeout_minutes=0", "parallel.timeout_minutes must be > 0"),
    ("--train.exit_after_minutes=0", r"train.exit_after_minutes must be > 0, or null \(no deadline\); got 0"),
    ("--train.exit_after_minutes=inf", "train.exit_after_minutes must be > 0"),
    ("--train.exit_margin_minutes=-1", "train.exit_margin_minutes must be >= 0; got -1"),
    ("--train.exit_signal=SIGKILL", "train.exit_signal must be one of SIGUSR1 | SIGUSR2 | .*; got 'SIGKILL'"),
    ("--model.semantic.weight=-1", "semantic.weight must be >= 0"),  # the model config's own check
    ("--logging.profile_steps=[5,2]", r"logging.profile_steps must be \[first, last\] with 1 <= first <= last; got \[5, 2\]"),
    ("--logging.profile_steps=[0,2]", r"logging.profile_steps must be \[first, last\]"),
    ("--logging.profile_ranks=[-1]", "logging.profile_ranks must be global ranks"),
    ("--logging.eval_sets=[{name: a, path: x.tsv, kind: csv}]", r"logging.eval_sets\[0\].kind must be one of"),
    ("--logging.eval_sets=[{name: a, path: x.tsv}, {name: a, path: y.tsv}]", "name 'a' is used twice"),
    ("--logging.eval_sets=[{name: a, path: x.tsv, max_rows: 0}]", r"logging.eval_sets\[0\].max_rows"),
    ("--data.tokenizer=null", "logging.eval_sets needs data.tokenizer"),
])
def test_numeric_options_are_bounded_by_name(override, message):
    with pytest.raises((ConfigError, ConfigLoadError), match=message):
        load_config(RunConfig, "examples/configs/tiny_cpu.yaml", [override]).validate(world_size=1)
