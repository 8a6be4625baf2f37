import sys

from beyond_top1.cli import main

sys.exit(main())
