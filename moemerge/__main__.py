import sys

from moemerge.cli import main

sys.exit(main())
