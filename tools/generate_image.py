#!/usr/bin/env python
"""Generate images from a checkpoint's semantic and pixel heads.

    python tools/generate_image.py --load CKPT --prompt "a red circle" [--prompt TEXT ...] \\
        --out FILE.png | DIR [--cfg-scale S --guide both|semantic|pixel --steps N --seed K \\
        --temperature T --tokenizer PATH --no-cache]

See megatron_unihetero/generation/image_cli.py for every option, generation/sample.py for how.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unihetero.generation.image_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
