"""``python -m keras_sapa.demo``: the same as ``python -m keras_sapa demo``."""

import sys

from keras_sapa.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
