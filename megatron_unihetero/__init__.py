"""megatron_unihetero: pretraining unified vision-language models (UniHetero) on megatron-core."""

__version__ = "0.1.0"
