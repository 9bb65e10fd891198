import sys

from lazyfs.cli import main

sys.exit(main())
