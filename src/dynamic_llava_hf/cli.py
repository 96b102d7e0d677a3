"""`dynamic-llava` command line. It lives in the `dynamic_llava_hf_cli` package, which imports neither torch nor
transformers until a command runs (see there); `main` is importable from here too."""

import sys

from dynamic_llava_hf_cli import main


if __name__ == "__main__":
    sys.exit(main())
