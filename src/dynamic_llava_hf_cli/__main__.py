"""`python -m dynamic_llava_hf_cli` = `dynamic-llava`."""

import sys

from . import main


sys.exit(main())
