import sys

from hf_decoding_ext.cli import main

sys.exit(main())
