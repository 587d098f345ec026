import sys

from meanflow.cli import main

sys.exit(main())
