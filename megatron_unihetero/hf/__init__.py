"""HuggingFace interop: export checkpoints to transformers Llava, import HF Llama/vision weights.

* :func:`export_checkpoint` (export.py): checkpoint of any TP/PP -> LlavaForConditionalGeneration
  folder (4.x on-disk layout), tokenizer, LlavaProcessor, and the generation heads file.
* :func:`import_hf` (importer.py): LlamaForCausalLM + vision encoder folders, or an exported
  Llava folder -> a checkpoint any TP/PP loads (the folder's tokenizer; the vocabulary grown
  for its specials and padded for TP; the encoder at ``--image-size``).
* :func:`load_unihetero_heads` (heads.py): the heads beside an exported model.

Nothing here downloads or runs remote code: every path is a local folder.
"""

from megatron_unihetero.hf.configs import ConversionError
from megatron_unihetero.hf.export import export_checkpoint
from megatron_unihetero.hf.heads import load_unihetero_heads
from megatron_unihetero.hf.importer import import_hf

__all__ = ["ConversionError", "export_checkpoint", "import_hf", "load_unihetero_heads"]
